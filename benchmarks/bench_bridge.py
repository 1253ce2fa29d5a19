"""Does users.bridge distort timing? Streams through httpx.AsyncClient with and without it, against server truth.

    python benchmarks/bench_bridge.py [--users 1 50 200] [--seconds 6] [--loop uvloop|stock] [--json out.json]

It starts the simulator (`EmbeddedSimulator`, its own process, `--step-base-ms 10`, enough slots for every
user, outputs always running to `max_tokens`) and, for each user count N and each setup below, a fresh client
process (this script again, `--worker`) in which N users stream chat completions back to back for a fixed
time. Body: {"model":"llm","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":20}, with
`X-Request-Id: <id>` so the simulator's ledger (GET /stopstorm/ledger) holds each request as `chatcmpl-<id>`.
Setups, all with the same httpx.AsyncClient code and the same loop implementation:

- `asyncio`: plain asyncio, N tasks; no gevent, no bridge (the baseline).
- `bridge`: `monkey.patch_all()`, N greenlets, each request ONE `bridge.run()` that streams the whole response
  inside the loop; the first content chunk is stamped in the coroutine.
- `bridge/chunk`: as `bridge`, but the greenlet pulls every line through its own `bridge.run()` (open, next
  line…, close) and stamps the first content chunk after it resumes: what a greenlet-side reader sees.

Measured, after a warm-up second:
- bridge round trip: call → coroutine start, and coroutine end → greenlet resumes (p50/p99, µs);
- first-token delay: client `time.monotonic()` at the first content chunk minus the ledger's `first_token`
  (also `time.monotonic()`: CLOCK_MONOTONIC is system-wide on Linux), p50/p99 in ms: the transport plus
  whatever the client adds, the number a load test would get wrong if the bridge distorted timing;
- client CPU per request (user+system time of the client process).
Also the floor: an empty `bridge.run()` round trip, one greenlet, sequential.

With two or more CPUs the simulator is pinned to CPU 0 and each client to CPU 1, as a Locust worker owns one
core. Loopback only; every process it starts is stopped by its PID; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETUPS = ("asyncio", "bridge", "bridge/chunk")
BODY = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 20}
WARMUP_S = 1.0
SIM_CPU, CLIENT_CPU = 0, 1


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def _first_content(line: str) -> bool:
    """A `data:` line whose delta carries text (not the role chunk, not [DONE])."""
    if not line.startswith("data: {"):
        return False
    delta = json.loads(line[6:])["choices"]
    return bool(delta and delta[0].get("delta", {}).get("content"))


# --- the client (runs in its own process: `bench_bridge.py --worker SETUP URL N SECONDS LOOP`) ---------------


def _new_loop(kind: str) -> Any:
    import asyncio

    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _make_client(n: int) -> Any:
    """A client for `n` concurrent streams. Plain http on loopback: `verify=False` skips the ~20 ms CA load."""
    import httpx

    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    return httpx.AsyncClient(timeout=30, limits=limits, verify=False, trust_env=False)


SHARED = os.environ.get("STOPSTORM_BENCH_SHARED_CLIENT") == "1"


async def _stream_once(client: Any, url: str, rid: str, marks: dict[str, float]) -> None:
    """One whole stream inside the loop; stamps the first content chunk in the loop's thread."""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=BODY, headers={"X-Request-Id": rid}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if "first" not in marks and _first_content(line):
                marks["first"] = time.monotonic()


def _worker_asyncio(url: str, n: int, seconds: float, loop_kind: str) -> dict[str, Any]:
    import asyncio

    records: list[list[Any]] = []
    errors: list[str] = []

    async def user(client: Any, stop_at: float, offset: float) -> None:
        await asyncio.sleep(offset)
        while time.monotonic() < stop_at:
            rid, marks = uuid.uuid4().hex, {}
            t0 = time.monotonic()
            try:
                await _stream_once(client, url, rid, marks)
                records.append([rid, t0, marks.get("first"), None, None])
            except Exception as exc:
                errors.append(repr(exc))

    async def main() -> None:
        clients = [_make_client(n)] * n if SHARED else [_make_client(1) for _ in range(n)]
        try:
            stop_at = time.monotonic() + seconds
            users = [user(clients[i], stop_at, 0.2 * i / n) for i in range(n)]
            await asyncio.wait_for(asyncio.gather(*users), seconds + 30)
        finally:
            for client in set(clients):
                await client.aclose()

    loop = _new_loop(loop_kind)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return {"records": records, "errors": errors}


def _worker_bridge(url: str, n: int, seconds: float, loop_kind: str, per_chunk: bool) -> dict[str, Any]:
    from gevent import monkey

    monkey.patch_all()
    import gevent

    from stopstorm.users.bridge import AsyncBridge

    bridge = AsyncBridge(use_uvloop=loop_kind == "uvloop")
    if SHARED:
        clients = [bridge.run(lambda: _make_client(n))] * n
    else:  # each user owns its client, as a Locust user does
        clients = [bridge.run(lambda: _make_client(1)) for _ in range(n)]
    records: list[list[Any]] = []
    errors: list[str] = []
    call_start: list[float] = []  # per bridge.run() in per-chunk mode: call → coroutine start
    call_resume: list[float] = []  # coroutine end → greenlet resumes

    def timed(coro_fn: Any) -> tuple[Any, float, float, float]:
        """bridge.run(coro_fn) with its round-trip marks: (value, start delay, resume delay, resume time)."""
        marks: dict[str, float] = {}

        async def wrapper() -> Any:
            marks["start"] = time.monotonic()
            try:
                return await coro_fn()
            finally:
                marks["end"] = time.monotonic()

        t_call = time.monotonic()
        value = bridge.run(wrapper)
        t_resume = time.monotonic()
        return value, marks["start"] - t_call, t_resume - marks["end"], t_resume

    def one_request_whole(client: Any, rid: str) -> list[Any]:
        marks: dict[str, float] = {}
        _, start_delay, resume_delay, _ = timed(lambda: _stream_once(client, url, rid, marks))
        return [marks.get("first"), start_delay, resume_delay]

    def one_request_per_chunk(client: Any, rid: str) -> list[Any]:
        async def enter() -> Any:
            cm = client.stream("POST", f"{url}/v1/chat/completions", json=BODY, headers={"X-Request-Id": rid})
            response = await cm.__aenter__()
            return cm, response, response.aiter_lines()

        (cm, response, lines), s, r, _ = timed(enter)
        starts, resumes, first = [s], [r], None
        try:
            response.raise_for_status()
            while True:
                line, s, r, t_resume = timed(lambda: anext(lines, None))
                starts.append(s)
                resumes.append(r)
                if line is None:
                    break
                if first is None and _first_content(line):
                    first = t_resume
        finally:
            _, s, r, _ = timed(lambda: cm.__aexit__(None, None, None))
            starts.append(s)
            resumes.append(r)
        return [first, starts, resumes]

    def user(client: Any, stop_at: float, offset: float, measure_from: float) -> None:
        gevent.sleep(offset)
        while time.monotonic() < stop_at:
            rid = uuid.uuid4().hex
            t0 = time.monotonic()
            try:
                if per_chunk:
                    first, starts, resumes = one_request_per_chunk(client, rid)
                    if t0 >= measure_from:
                        call_start.extend(starts)
                        call_resume.extend(resumes)
                    records.append([rid, t0, first, None, None])
                else:
                    records.append([rid, t0, *one_request_whole(client, rid)])
            except Exception as exc:
                errors.append(repr(exc))

    floor: dict[str, float | None] = {}
    if n == 1 and not per_chunk:  # the empty round trip, once
        import asyncio

        async def empty() -> None:
            await asyncio.sleep(0)

        for _ in range(200):
            bridge.run(empty)
        total = []
        for _ in range(3000):
            t = time.monotonic()
            bridge.run(empty)
            total.append(time.monotonic() - t)
        floor = {"p50": _pct(total, 50), "p99": _pct(total, 99)}

    start = time.monotonic()
    stop_at, measure_from = start + seconds, start + WARMUP_S
    with gevent.Timeout(seconds + 30):
        gevent.joinall([gevent.spawn(user, clients[i], stop_at, 0.2 * i / n, measure_from) for i in range(n)],
                       raise_error=True)
    for client in set(clients):
        bridge.run(client.aclose)
    bridge.close()
    return {"records": records, "errors": errors, "call_start": call_start, "call_resume": call_resume,
            "floor": floor}


def _worker(argv: list[str]) -> None:
    if os.environ.get("STOPSTORM_BENCH_SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["STOPSTORM_BENCH_SWITCH_INTERVAL"]))
    setup, url, n, seconds, loop_kind = argv[0], argv[1], int(argv[2]), float(argv[3]), argv[4]
    if setup == "asyncio":
        out = _worker_asyncio(url, n, seconds, loop_kind)
    else:
        out = _worker_bridge(url, n, seconds, loop_kind, per_chunk=setup == "bridge/chunk")
    usage = os.times()
    out["cpu_s"] = usage.user + usage.system
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: nothing is left to flush or close


# --- the driver -------------------------------------------------------------------------------------------------


def _get_json(url: str, data: bytes | None = None) -> Any:
    import urllib.request  # here, not at the top: a bridge worker patches before ssl is imported

    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as resp:
        return json.loads(resp.read())


def _run_worker(setup: str, url: str, n: int, seconds: float, loop_kind: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", setup, url, str(n), str(seconds), loop_kind]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(proc.pid, {CLIENT_CPU})
    try:
        stdout, stderr = proc.communicate(timeout=seconds + 90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise RuntimeError(f"worker {setup} N={n} did not finish in time") from None
    if proc.returncode != 0 or not stdout.strip():
        raise RuntimeError(f"worker {setup} N={n} failed (rc={proc.returncode}): {stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def _samples(setup: str, out: dict[str, Any], ledger: dict[str, Any]) -> dict[str, list[float]]:
    """One run's measured samples (after its warm-up second), joined with the ledger's server truth."""
    by_id = {e["request_id"]: e for e in ledger["requests"]}
    t_first = min((r[1] for r in out["records"]), default=0.0)
    delays, starts, resumes = [], [], []
    for rid, t0, first, start_delay, resume_delay in out["records"]:
        if t0 < t_first + WARMUP_S:
            continue
        entry = by_id.get(f"chatcmpl-{rid}")
        if first is not None and entry is not None and entry.get("first_token") is not None:
            delays.append(first - entry["first_token"])
        if start_delay is not None:
            starts.append(start_delay)
            resumes.append(resume_delay)
    if setup == "bridge/chunk":
        starts, resumes = out["call_start"], out["call_resume"]
    return {"delays": delays, "starts": starts, "resumes": resumes}


def _row(setup: str, n: int, runs: list[tuple[dict[str, Any], dict[str, list[float]]]]) -> dict[str, Any]:
    """Pool the runs of one (setup, N)."""
    delays = [v for _, s in runs for v in s["delays"]]
    starts = [v for _, s in runs for v in s["starts"]]
    resumes = [v for _, s in runs for v in s["resumes"]]
    requests = sum(len(out["records"]) for out, _ in runs)
    errors = [e for out, _ in runs for e in out["errors"]]
    cpu_s = sum(out["cpu_s"] for out, _ in runs)
    return {
        "setup": setup, "users": n, "runs": len(runs), "requests": requests, "measured": len(delays),
        "errors": len(errors), "error_sample": errors[:3], "bridge_calls": len(starts),
        "start_p50_us": _us(_pct(starts, 50)), "start_p99_us": _us(_pct(starts, 99)),
        "resume_p50_us": _us(_pct(resumes, 50)), "resume_p99_us": _us(_pct(resumes, 99)),
        "ft_delay_p50_ms": _ms(_pct(delays, 50)), "ft_delay_p99_ms": _ms(_pct(delays, 99)),
        "cpu_ms_per_request": round(cpu_s * 1000 / requests, 2) if requests else None,
        "floor": next((out["floor"] for out, _ in runs if out.get("floor")), None),
    }


def _us(v: float | None) -> float | None:
    return None if v is None else round(v * 1e6, 1)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1e3, 2)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:g}"


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = ("setup", "N", "reqs", "run() calls", "call→start p50/p99 µs", "end→resume p50/p99 µs",
              "client−server 1st token p50/p99 ms", "CPU ms/req")
    lines = [header]
    for r in rows:
        lines.append((r["setup"], str(r["users"]), str(r["measured"]), str(r["bridge_calls"] or "—"),
                      f"{_fmt(r['start_p50_us'])} / {_fmt(r['start_p99_us'])}",
                      f"{_fmt(r['resume_p50_us'])} / {_fmt(r['resume_p99_us'])}",
                      f"{_fmt(r['ft_delay_p50_ms'])} / {_fmt(r['ft_delay_p99_ms'])}", _fmt(r["cpu_ms_per_request"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for i, line in enumerate(lines):
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    for r in rows:
        if r["floor"]:
            print(f"\nempty bridge.run() round trip, one greenlet, sequential: p50 {r['floor']['p50'] * 1e6:.1f} µs, "
                  f"p99 {r['floor']['p99'] * 1e6:.1f} µs")
    for r in rows:
        if r["errors"]:
            print(f"{r['setup']} N={r['users']}: {r['errors']} errors, e.g. {r['error_sample']}")


def _wait_ledger_settled(url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10  # let the last streams leave the ledger's in-flight state
    while True:
        ledger = _get_json(f"{url}/stopstorm/ledger")
        if all(e["freed"] is not None for e in ledger["requests"]) or time.monotonic() > deadline:
            return ledger
        time.sleep(0.1)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="streaming time per run (default 5; at least 10 / N, so N=1 gets enough requests)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per (setup, N), interleaved in alternating order and pooled (default 2)")
    parser.add_argument("--loop", choices=["uvloop", "stock"], default="uvloop")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval() in every client (default: Python's 0.005 s)")
    parser.add_argument("--shared-client", action="store_true",
                        help="one httpx.AsyncClient for all users, not one each (its pool costs O(N) per request)")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.shared_client:
        os.environ["STOPSTORM_BENCH_SHARED_CLIENT"] = "1"
    if args.switch_interval is not None:
        os.environ["STOPSTORM_BENCH_SWITCH_INTERVAL"] = str(args.switch_interval)

    from stopstorm.simulator.launcher import EmbeddedSimulator

    sim_args = ["--step-base-ms", "10", "--max-num-seqs", str(max(args.users) + 8), "--output-len", "fixed:1000"]
    rows = []
    t_start = time.monotonic()
    with EmbeddedSimulator(sim_args) as sim:
        assert sim.url is not None and sim.pid is not None
        if (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(sim.pid, {SIM_CPU})
        print(f"simulator {sim.url} (pid {sim.pid}); loop {args.loop}; switch interval "
              f"{args.switch_interval or sys.getswitchinterval()} s; "
              f"{'one shared client' if args.shared_client else 'one client per user'}; {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        for n in args.users:
            seconds = max(args.seconds, 10.0 / n)
            runs: dict[str, list[tuple[dict[str, Any], dict[str, list[float]]]]] = {s: [] for s in args.setups}
            for rep in range(args.repeats):
                for setup in args.setups if rep % 2 == 0 else reversed(args.setups):
                    _get_json(f"{sim.url}/stopstorm/ledger/reset", data=b"")
                    out = _run_worker(setup, sim.url, n, seconds, args.loop)
                    runs[setup].append((out, _samples(setup, out, _wait_ledger_settled(sim.url))))
                    print(f"  N={n:<4} {setup:<13} run {rep + 1}: {len(out['records'])} requests, "
                          f"{len(out['errors'])} errors", flush=True)
            rows += [_row(setup, n, runs[setup]) for setup in args.setups]
    _print_table(rows)
    print(f"\n{time.monotonic() - t_start:.0f} s in all; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        from results_doc import document, dumps  # beside this script
        from results_doc import table as results_table

        def pick(setup: str, n: int) -> dict[str, Any]:
            return next((r for r in rows if r["setup"] == setup and r["users"] == n), {})

        delay = [{"users": n, "asyncio_p50_ms": pick("asyncio", n).get("ft_delay_p50_ms"),
                  "asyncio_p99_ms": pick("asyncio", n).get("ft_delay_p99_ms"),
                  "bridge_p50_ms": pick("bridge", n).get("ft_delay_p50_ms"),
                  "bridge_p99_ms": pick("bridge", n).get("ft_delay_p99_ms"),
                  "start_p50_us": pick("bridge", n).get("start_p50_us"),
                  "resume_p50_us": pick("bridge", n).get("resume_p50_us")} for n in args.users]
        figures = [{"id": "empty_round_trip", "label": "an empty bridge.run() round trip, one greenlet, sequential",
                    "value": round(r["floor"]["p50"] * 1e6, 1), "unit": "µs"} for r in rows if r["floor"]][:1]
        chunk = pick("bridge/chunk", max(args.users))
        if chunk.get("ft_delay_p50_ms") is not None:
            figures.append({"id": f"bridge_chunk_p50_{max(args.users)}", "label": "first-token delay p50 at N = "
                            f"{max(args.users)} pulling each chunk through its own bridge call (bridge/chunk)",
                            "value": chunk["ft_delay_p50_ms"], "unit": "ms"})
        title = (f"httpx.AsyncClient streams from N greenlets through the bridge vs the same code on plain asyncio "
                 f"({args.loop}, {args.repeats} runs pooled): client-minus-server first-token delay (server truth: "
                 "the ledger's first_token)")
        doc = document("bench_bridge", {"first_token_delay": results_table(RESULTS_COLUMNS, delay, title)}, figures,
                       rows=rows)
        Path(args.json).write_text(dumps(doc) + "\n")


# The results table's columns (benchmarks/results/bench_bridge.json; rendered by benchmarks/render_tables.py).
RESULTS_COLUMNS = [
    {"label": "N", "key": "users", "format": "{:,}", "align": "right"},
    {"label": "plain asyncio p50 / p99 ms", "keys": ["asyncio_p50_ms", "asyncio_p99_ms"], "sep": " / ",
     "align": "right"},
    {"label": "through the bridge p50 / p99 ms", "keys": ["bridge_p50_ms", "bridge_p99_ms"], "sep": " / ",
     "align": "right"},
    {"label": "bridge call→start p50 µs", "key": "start_p50_us", "format": "{:,g}", "align": "right"},
    {"label": "bridge end→resume p50 µs", "key": "resume_p50_us", "format": "{:,g}", "align": "right"},
]


if __name__ == "__main__":
    main()
