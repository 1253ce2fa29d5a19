"""What reading the server log through a command costs: the delay a pipe adds to each line's stamp, and the hub
lag the reader adds while a chatty command prints.

    python benchmarks/bench_log_pipe.py [--lines 400] [--rate 40] [--chatty 200000] [--json out.json]

1. Delay. A writer appends vLLM abort lines (`Aborted request(s) chatcmpl-<id>-<8 hex>.`) to a file, one
   `os.write` each on an O_APPEND fd, at exponential intervals (mean 1/`--rate` s), noting `time.monotonic()`
   right after each write. Followed at the same time by:
   - `file`: `--server-log FILE` (LogFollower, its default 20 ms poll);
   - `tail -F`: `--server-log-cmd "tail -n 0 -F FILE"` (PipeLogFollower; GNU tail wakes on inotify);
   - `tail -F | cat`: the same plus one more pipe hop, as a relay (ssh, kubectl) adds one.
   Delay = the follower's stamp (`LogEvent.seen`, `time.monotonic()` when the line was read) − the write.
   This is what the transport adds to the log's "Stop → abort logged" latency; a remote relay adds its
   network round trip on top (not measured here: no second host).
2. Hub lag. A greenlet sleeps 1 ms in a loop and notes how late it wakes: with nothing else (baseline), then
   while `yes LINE | head -n N` is read by a PipeLogFollower (every line an `Added request` event line).

One process, gevent-patched as under Locust (locust imported first); loopback and temp files only; every
command it starts is stopped by its PID (the follower's own stop); bounded in time.
"""

from __future__ import annotations

# isort: off
import locust  # noqa: F401  (first: gevent's monkey-patching, as under Locust)
# isort: on

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import gevent

from stopstorm.metrics.truth.log_command import PipeLogFollower
from stopstorm.metrics.truth.vllm_log import LineFollower, LogFollower

ABORT = "(APIServer pid=1) INFO {stamp} [async_llm.py:922] Aborted request(s) {rid}.\n"
ADDED = "(APIServer pid=1) INFO 12-01 10:00:00 [async_llm.py:578] Added request chatcmpl-chatty-bf54943d."


def _ms(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=100)
    return {"count": len(values), "p50_ms": q[49] * 1e3, "p90_ms": q[89] * 1e3, "p99_ms": q[98] * 1e3,
            "max_ms": max(values) * 1e3, "mean_ms": statistics.fmean(values) * 1e3}


def delay(lines: int, rate: float, rng: random.Random) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vllm.log"
        path.touch()
        followers: dict[str, LineFollower] = {
            "file (20 ms poll)": LogFollower(path),
            "tail -F": PipeLogFollower(f"tail -n 0 -F {path}"),
            "tail -F | cat": PipeLogFollower(f"tail -n 0 -F {path} | cat"),
        }
        for f in followers.values():
            f.start()
        gevent.sleep(0.5)  # tail is up and watching
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        written: dict[str, float] = {}
        try:
            for _ in range(lines):
                base = f"chatcmpl-{uuid.uuid4().hex}"
                rid = f"{base}-{zlib.crc32(base.encode()):08x}"
                os.write(fd, ABORT.format(stamp=time.strftime("%m-%d %H:%M:%S"), rid=rid).encode())
                written[base] = time.monotonic()
                gevent.sleep(rng.expovariate(rate))
            gevent.sleep(0.5)
        finally:
            os.close(fd)
            for f in followers.values():
                f.stop()
        out: dict[str, Any] = {}
        for name, f in followers.items():
            d = [f.aborted[b].seen - t for b, t in written.items() if b in f.aborted]
            out[name] = {**_ms(d), "missed": len(written) - len(d)}
        return out


def hub_lag(seconds: float | None = None, command: str | None = None, expect: int = 0) -> dict[str, Any]:
    lags: list[float] = []
    done = False

    def sampler() -> None:
        while not done:
            t = time.perf_counter()
            gevent.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    g = gevent.spawn(sampler)
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if command is None:
        gevent.sleep(seconds or 1.0)
    else:
        f = PipeLogFollower(command).start()
        deadline = time.monotonic() + 120
        while f.lines < expect and time.monotonic() < deadline:
            gevent.sleep(0.01)
        took = time.perf_counter() - t0
        f.stop()
        extra = {"lines": f.lines, "seconds": took, "lines_per_s": f.lines / took,
                 "us_per_line": took / max(1, f.lines) * 1e6}
    done = True
    g.join(1)
    return {**_ms(lags), **extra}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=400, help="abort lines written for the delay (default 400)")
    p.add_argument("--rate", type=float, default=40.0, help="lines per second, on average (default 40)")
    p.add_argument("--chatty", type=int, default=200_000, help="lines the chatty command prints (default 200000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    results: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    results["delay"] = delay(a.lines, a.rate, random.Random(a.seed))
    print("delay, line written → stamped by the follower (ms):")
    print("| form | lines | p50 | p90 | p99 | max | missed |\n|---|---|---|---|---|---|---|")
    for name, r in results["delay"].items():
        print(f"| {name} | {r['count']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['max_ms']:.2f} | {r['missed']} |")
    baseline = hub_lag(seconds=2.0)
    chatty = hub_lag(command=f"yes '{ADDED}' | head -n {a.chatty}", expect=a.chatty)
    results["hub_lag"] = {"baseline": baseline, "chatty command": chatty}
    print(f"\nhub lag, a 1 ms sleeper's overshoot (ms); chatty: {chatty['lines']} lines in {chatty['seconds']:.2f} s "
          f"= {chatty['lines_per_s']:,.0f} lines/s, {chatty['us_per_line']:.1f} µs/line:")
    print("| while | samples | p50 | p99 | max |\n|---|---|---|---|---|")
    for name, r in results["hub_lag"].items():
        print(f"| {name} | {r['count']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
