"""Does one fast stream hold the hub? Hub lag and timer lateness while streams are read from a flooding server.

    python benchmarks/bench_flood.py [--stacks requests openai ...] [--streams 2] [--no-yield | --both]
                                     [--json flood.json]

Method: tests/hostile_server.py (its own process) serves `flood`: a well-formed stream of 20 000 tokens written in
64 KiB writes without a pause, so the client's socket buffer is never empty and a read loop that only waits for
bytes never waits (`flood-big`, 200 000 tokens, for the raw stacks, which read 20 000 in a fraction of a second).
In this process (gevent monkey-patched, as under Locust), per client stack, `--streams` streams are read at once
through the stack's transport (users/single.py: the users' own read loop), with:

- a ticker greenlet that sleeps 1 ms again and again: each wake-up later than asked is hub lag (the time the
  hub could not run it: what Locust's `-t`, a Stop timer or `hold`'s end would wait), p50 / p99 / max;
- one timer set to fire 0.5 s after the streams start: how late it fired (`timer_late_ms`);
- for the async stacks, the same ticker on the bridge's asyncio loop (`loop_*`: their Stop timers run there);
- the process's garbage-collector pauses (`gc_max_ms`): a collection holds the hub too, and it is not the read
  loop's doing (the SDK's chunk objects make the most garbage).

`--no-yield` sets the read loops' hub-yield interval (users/core.py `HUB_YIELD_S`) to infinity: the loop before
the fix; `--both` measures that first, then the loop as it is (two tables). The numbers move with the machine's
load: run it on a quiet machine (and say what ran beside it).
"""

from __future__ import annotations

# isort: off
import locust  # noqa: F401  (first: gevent's monkey-patching, as under Locust)
# isort: on

import argparse
import asyncio
import gc
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gevent

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from stream_tools import make_settings  # noqa: E402  (tests/ holds the shared single-stream settings)

from stopstorm.users import core  # noqa: E402
from stopstorm.users.bridge import get_bridge  # noqa: E402
from stopstorm.users.policy import StopPlan  # noqa: E402
from stopstorm.users.single import SingleStreams  # noqa: E402
from stopstorm.users.stacks import STACKS, is_async  # noqa: E402

TICK_S = 0.001
TIMER_S = 0.5
RESULTS_COLUMNS = [
    {"label": "stack", "key": "stack", "align": "left"},
    {"label": "hub yield", "key": "yield", "align": "left"},
    {"label": "streams × tokens", "key": "work", "align": "left"},
    {"label": "wall s", "key": "wall_s", "format": "{:.2f}"},
    {"label": "tokens/s", "key": "tokens_per_s", "format": "{:,.0f}"},
    {"label": "hub lag p50 / p99 / max ms", "keys": ["lag_p50_ms", "lag_p99_ms", "lag_max_ms"], "sep": " / ",
     "format": "{:.2f}"},
    {"label": "0.5 s timer late ms", "key": "timer_late_ms", "format": "{:.1f}"},
    {"label": "bridge loop lag p99 / max ms", "keys": ["loop_p99_ms", "loop_max_ms"], "sep": " / ",
     "format": "{:.2f}"},
    {"label": "GC pause max ms", "key": "gc_max_ms", "format": "{:.1f}"},
]


class _GcPauses:
    """Every garbage collection's pause while it is on (ms)."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._t = 0.0

    def __call__(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.pauses.append((time.perf_counter() - self._t) * 1e3)

    def __enter__(self) -> _GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        gc.callbacks.remove(self)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _hostile() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hostile_server.py")], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("hostile server listening on "):
        proc.kill()
        raise SystemExit(f"the hostile server did not start: {line!r}")
    return proc, line.split()[-1]


class _Ticker:
    """Sleeps TICK_S again and again; each wake-up's lateness is a lag sample (ms)."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._greenlet: gevent.Greenlet | None = None

    def _run(self) -> None:
        while True:
            t = time.perf_counter()
            gevent.sleep(TICK_S)
            self.lags.append(max(0.0, (time.perf_counter() - t - TICK_S) * 1e3))

    def start(self) -> _Ticker:
        self._greenlet = gevent.spawn(self._run)
        return self

    def stop(self) -> list[float]:
        if self._greenlet is not None:
            self._greenlet.kill()
        return self.lags


async def _loop_ticker(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(TICK_S)
        lags.append(max(0.0, (time.perf_counter() - t - TICK_S) * 1e3))


SDK = ("openai", "openai-async")  # ~5-15k chunks/s: `flood`; the raw stacks read `flood-big`


def _measure(streams: SingleStreams, stack: str, url: str, n: int) -> dict[str, Any]:
    big = stack not in SDK
    tokens = 200_000 if big else 20_000  # tests/hostile_server.py FLOOD_BIG_TOKENS, FLOOD_TOKENS
    settings = make_settings(f"{url}/b/{'flood-big' if big else 'flood'}", max_tokens=tokens, ignore_eos=False,
                             read_timeout=60.0, headers_timeout=60.0, connect_timeout=5.0)
    # Built, and one short stream read, before the clock starts: a stack's first request imports what its library
    # loads lazily (50-300 ms here, in the bridge's thread for async stacks): a one-time cost, not the read loop's.
    streams.run(stack, make_settings(f"{url}/b/ok", max_tokens=8, ignore_eos=False), "none", StopPlan())
    bridge = get_bridge()
    loop_lags: list[float] = []
    stop_loop: asyncio.Event | None = None
    loop_task = None
    if is_async(stack):
        stop_loop = asyncio.Event()  # bound to the bridge's loop at its first use there
        loop_task = gevent.spawn(bridge.run, lambda: _loop_ticker(loop_lags, stop_loop))
    ticker = _Ticker().start()
    gevent.sleep(0.05)
    fired: list[float] = []
    with _GcPauses() as collections:
        t0 = time.monotonic()
        timer = gevent.spawn_later(TIMER_S, lambda: fired.append(time.monotonic()))
        jobs = [gevent.spawn(streams.run, stack, settings, "none", StopPlan()) for _ in range(n)]
        gevent.joinall(jobs, raise_error=True)
        wall = time.monotonic() - t0
    timer.join(timeout=5)
    lags = ticker.stop()
    if stop_loop is not None and loop_task is not None:
        bridge.loop.call_soon_threadsafe(stop_loop.set)
        loop_task.join(timeout=5)
    records = [j.value for j in jobs]
    errors = [r.error for r in records if r.error]
    read = sum(r.tokens for r in records)
    row = {"stack": stack, "yield": "off" if math.isinf(core.HUB_YIELD_S) else f"{core.HUB_YIELD_S * 1e3:g} ms",
           "work": f"{n} × {tokens:,}", "wall_s": round(wall, 3), "tokens_per_s": round(read / wall),
           "lag_p50_ms": _round(_quantile(lags, 0.5)), "lag_p99_ms": _round(_quantile(lags, 0.99)),
           "lag_max_ms": _round(max(lags) if lags else None),
           "timer_late_ms": round((fired[0] - t0 - TIMER_S) * 1e3, 1) if fired else None,
           "loop_p99_ms": _round(_quantile(loop_lags, 0.99)), "loop_max_ms": _round(max(loop_lags, default=None)),
           "gc_max_ms": _round(max(collections.pauses, default=0.0)), "gc_collections": len(collections.pauses),
           "ticks": len(lags), "tokens_read": read, "errors": errors}
    return row


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stacks", nargs="+", default=list(STACKS), choices=list(STACKS))
    ap.add_argument("--streams", type=int, default=2, help="flood streams read at once per stack (default 2)")
    ap.add_argument("--no-yield", action="store_true", help="the read loops never yield (the loop before the fix)")
    ap.add_argument("--both", action="store_true", help="--no-yield first, then the loop as it is")
    ap.add_argument("--json", help="also write the results (benchmarks/results shape) to this file")
    args = ap.parse_args()
    passes = [math.inf, core.HUB_YIELD_S] if args.both else [math.inf] if args.no_yield else [core.HUB_YIELD_S]
    server, url = _hostile()
    streams = SingleStreams()
    rows = []
    t_start = time.monotonic()
    try:
        for every in passes:
            for stack in args.stacks:
                core.HUB_YIELD_S = every
                row = _measure(streams, stack, url, args.streams)
                rows.append(row)
                print(f"{stack:<13} yield {row['yield']:<5} wall {row['wall_s']:6.2f} s  "
                      f"{row['tokens_per_s']:>8,} tok/s  hub lag p50/p99/max "
                      f"{row['lag_p50_ms']}/{row['lag_p99_ms']}/{row['lag_max_ms']} ms  timer late "
                      f"{row['timer_late_ms']} ms  loop p99/max {row['loop_p99_ms']}/{row['loop_max_ms']} ms  "
                      f"GC max {row['gc_max_ms']} ms{'  errors: ' + str(row['errors'][:2]) if row['errors'] else ''}",
                      flush=True)
    finally:
        streams.close()
        server.terminate()
        server.wait(10)
    print(f"\n{time.monotonic() - t_start:.0f} s in all; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        from results_doc import document, dumps  # beside this script
        from results_doc import table as results_table

        title = (f"{args.streams} streams at once of a flooding server (64 KiB writes, no pause; 20,000 tokens for "
                 "the SDK stacks, 200,000 for the raw ones) per client stack, one process: hub lag (a 1 ms ticker's "
                 "lateness), a 0.5 s timer's, the bridge loop's")
        tables = {}
        for name, want in (("flood_no_yield", True), ("flood", False)):
            shown = {c.get("key") for c in RESULTS_COLUMNS} | {k for c in RESULTS_COLUMNS for k in c.get("keys", ())}
            picked = [{k: v for k, v in r.items() if k in shown} for r in rows if (r["yield"] == "off") == want]
            if picked:
                tables[name] = results_table(RESULTS_COLUMNS, picked, title + (" (read loops that never yield: "
                                                                              "before the fix)" if want else ""))
        doc = document("bench_flood", tables, rows=rows)
        Path(args.json).write_text(dumps(doc) + "\n")


if __name__ == "__main__":
    main()
