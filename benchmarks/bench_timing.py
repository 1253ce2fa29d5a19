"""Client timing error against server truth at 50, 200 and 500 concurrent streams, and Stop → close latency.

    python benchmarks/bench_timing.py [--streams 50 200 500] [--stacks requests fasthttp httpx-async]
                                      [--tokens 40] [--read-clock-too] [--json out.json]

The process is gevent-patched first, as a locustfile is. One simulator (`EmbeddedSimulator`, its own process,
pinned to CPU 0 when there are two) runs with `--ledger-send-times`, so its ledger holds, per request, the
moment each chunk was handed to the socket (`send_times`, and `first_sent` for the first token); the client
(pinned to CPU 1, a Locust worker's one core) runs N users at once, each one stream through stopstorm's own
core exactly as a user does (`run_stream`, or `arun_stream` through the bridge), with the self-monitor
running (metrics/plugin/self_monitor.py) so its loop lag and flags are shown beside the error.

Per stack and N, against the ledger:

- TTFT error: the record's first-token stamp minus the server's `first_sent` (the floor is loopback latency
  plus the client's own parse: anything more is the client's delay);
- chunk error: each token-carrying chunk's stamp minus the send time of the server chunk that brought the
  same running token count (continuous usage gives the count); ITL error: |client gap − server gap|;
- ingress: the ledger's `arrival` minus the record's start of TTFT (`written`, the request's last write, where
  the stack stamps it; else `sent`): the tool's own delay before the server had the request;
- Stop → close (a second pass with every user pressing Stop after `--stop-tokens` and closing): the client's
  own Stop → close-returned, and Stop → the server seeing the disconnect (`disconnect_seen`, server truth).

Streams start spread over `--spread-s` (a ramp, as Locust's spawn rate gives), and the step model is slow
enough (`--step-base-ms` 20) that the simulator keeps its schedule at 500 streams; its own lag shows in
`stopstorm_sim:step_lag_seconds_total`, printed too. Loopback only; every process it starts is stopped by
its PID; every run has a timeout.
"""

# ruff: noqa: E402  (gevent must patch before anything imports ssl, threading or socket)

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import gc
import os
import random
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import gevent

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_tools import get_json, pin
from stopstorm.metrics.plugin.self_monitor import SelfMonitor
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.ledger import LedgerSnapshot
from stopstorm.simulator.launcher import EmbeddedSimulator
from stopstorm.simulator.ledger import LedgerEntry
from stopstorm.users import socket_stamps
from stopstorm.users.bridge import get_bridge
from stopstorm.users.core import arun_stream, run_stream
from stopstorm.users.options import RunSettings, build_settings
from stopstorm.users.policy import StopPlan
from stopstorm.users.stacks import STACKS, is_async, transport_for

READ_CLOCK = " (read clock)"  # a row with the kernel's receive stamps off (--read-clock-too)
KERNEL_STAMPED = ("requests", "fasthttp", "httpx", "openai")  # plain HTTP on Linux: users/socket_stamps.py

SIM_CPU, CLIENT_CPU = 0, 1
RUN_TIMEOUT = 120.0
GC_FREEZE = False


def settings(url: str, tokens: int, stop_tokens: int | None) -> RunSettings:
    opts = argparse.Namespace(
        endpoint="chat", model="llm", prompts="", max_tokens=tokens, temperature=0.0, ignore_eos=True,
        no_usage=False, no_continuous_usage=False, api_key="",
        stop_probability=1.0 if stop_tokens else 0.0, stop_at=f"tokens:fixed:{stop_tokens or 1}",
        close_mix="close:1", hold_seconds=0.0, think_time=0.0, read_timeout=30.0)
    return build_settings(opts, url)




def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1e3:.2f}"


def run_users(stack: str, url: str, n: int, st: RunSettings, spread: float, stop: bool,
              monitor: SelfMonitor) -> tuple[list[StreamRecord], float, float]:
    """N users, one stream each, started over `spread` seconds; the records, client CPU and wall seconds.

    Clients are built first (an SSL context each blocks its loop ~25 ms), then the monitor starts."""
    rng = random.Random(n)
    bridge = get_bridge() if is_async(stack) else None
    transports = ([bridge.run(lambda: transport_for(stack)) for _ in range(n)] if bridge is not None
                  else [transport_for(stack) for _ in range(n)])
    records: list[StreamRecord] = []

    def user(i: int) -> None:
        gevent.sleep(rng.random() * spread)
        request = st.requests.build(rng)
        plan = st.stop_policy.draw(rng) if stop else StopPlan()
        record = StreamRecord(stack=stack, close_mode="close" if stop else "none", endpoint=request.endpoint,
                              request_id=request.request_id, stop_plan=str(plan), wall_start=time.time(),
                              sent=time.monotonic())
        if bridge is not None:
            bridge.run(lambda: arun_stream(transports[i], st, request, record, plan))
        else:
            run_stream(transports[i], st, request, record, plan)
        records.append(record)

    try:
        if GC_FREEZE:
            gc.freeze()  # the clients built above move to the permanent generation: full collections skip them
        monitor.start()
        gevent.sleep(0.1)
        c0, t0 = time.process_time(), time.monotonic()
        with gevent.Timeout(RUN_TIMEOUT):
            gevent.joinall([gevent.spawn(user, i) for i in range(n)], raise_error=True)
        cpu, wall = time.process_time() - c0, time.monotonic() - t0
        for r in records:
            monitor.check(r)
        monitor.stop()
    finally:
        for t in transports:
            if bridge is not None:
                bridge.run(t.shutdown, timeout=10)
            else:
                t.shutdown()
    return records, cpu, wall


def timing_errors(records: list[StreamRecord], ledger: dict[str, LedgerEntry],
                  monitor: SelfMonitor) -> dict[str, Any]:
    ttft, ttft_clean, chunk, itl, ingress = [], [], [], [], []
    missing = 0
    for rec in records:
        e = ledger.get(f"chatcmpl-{rec.request_id}")
        if e is None or rec.first_token is None or e.first_sent is None or rec.error:
            missing += 1
            continue
        ttft.append(rec.first_token - e.first_sent)
        # the tool's own delay before the server had the request: from TTFT's start (the write where stamped)
        ingress.append(e.arrival - (rec.sent if rec.written is None else rec.written))
        late = monitor.ttft_lateness(rec)
        if late is not None and late <= monitor.bound:  # the self-monitor does not flag this stamp
            ttft_clean.append(ttft[-1])
        sent_at = {int(n): t for t, n in e.send_times or []}
        prev = None
        for t, n in zip(rec.chunk_times, rec.chunk_tokens, strict=True):
            s = sent_at.get(n)
            if s is None:
                prev = None
                continue
            chunk.append(t - s)
            if prev is not None:
                itl.append(abs((t - prev[0]) - (s - prev[1])))
            prev = (t, s)
    return {"streams": len(records), "unjoined": missing, "ttft_err": ttft, "ttft_err_unflagged": ttft_clean,
            "chunk_err": chunk, "itl_err": itl, "ingress": ingress}


def stop_latency(records: list[StreamRecord], ledger: dict[str, LedgerEntry]) -> dict[str, list[float]]:
    client, server = [], []
    for rec in records:
        if rec.stop is None:
            continue
        if rec.closed is not None:
            client.append(rec.closed - rec.stop)
        e = ledger.get(f"chatcmpl-{rec.request_id}")
        if e is not None and e.disconnect_seen is not None:
            server.append(e.disconnect_seen - rec.stop)
    return {"stop_to_close": client, "stop_to_disconnect_seen": server}


def sim_lag(url: str) -> float | None:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("stopstorm_sim:step_lag_seconds_total"):
                return float(line.split()[-1])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--stacks", nargs="+", default=["requests", "fasthttp", "httpx-async"], choices=list(STACKS))
    parser.add_argument("--tokens", type=int, default=40, help="tokens per stream (default 40)")
    parser.add_argument("--stop-tokens", type=int, default=10, help="Stop after this many tokens (default 10)")
    parser.add_argument("--spread-s", type=float, default=1.0, help="users start over this many seconds")
    parser.add_argument("--step-base-ms", type=float, default=20.0)
    parser.add_argument("--max-loop-lag-ms", type=float, default=1.0,
                        help="the self-monitor's bound: TTFTs taken during a longer stall are flagged (default 1)")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() once the clients are built (do full-collection pauses shrink?)")
    parser.add_argument("--read-clock-too", action="store_true",
                        help="also run the sync stacks with the kernel's receive stamps off (the read clock), "
                        "side by side")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    global GC_FREEZE
    GC_FREEZE = args.gc_freeze

    labels = [label for stack in args.stacks for label in (
        (stack, stack + READ_CLOCK) if args.read_clock_too and stack in KERNEL_STAMPED else (stack,))]
    pinned = (os.cpu_count() or 1) >= 2 and {SIM_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)
    sim = EmbeddedSimulator(["--ledger-send-times", "--max-num-seqs", str(max(args.streams)), "--step-base-ms",
                             str(args.step_base_ms), "--step-per-seq-ms", "0", "--seed", "0"])
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        url = sim.start()
        if pinned:
            assert sim.pid is not None
            pin(sim.pid, SIM_CPU)
            pin(os.getpid(), CLIENT_CPU)
        print(f"stopstorm timing benchmark: {os.cpu_count()} CPUs, "
              + ("simulator on CPU 0, client on CPU 1" if pinned else "no pinning")
              + f"; step {args.step_base_ms} ms, {args.tokens} tokens per stream, stop after {args.stop_tokens}",
              flush=True)
        for label in labels:
            stack = label.removesuffix(READ_CLOCK)
            socket_stamps.RECEIVE_STAMPS = not label.endswith(READ_CLOCK)
            for n in args.streams:
                for stop in (False, True):
                    urllib.request.urlopen(urllib.request.Request(url + "/stopstorm/ledger/reset", method="POST"),
                                           timeout=10).read()
                    lag0 = sim_lag(url)
                    monitor = SelfMonitor(interval=0.01, bound=args.max_loop_lag_ms / 1e3)
                    records, cpu, wall = run_users(
                        stack, url, n, settings(url, args.tokens, args.stop_tokens if stop else None),
                        args.spread_s, stop, monitor)
                    gevent.sleep(0.3)  # the last disconnects reach the ledger
                    ledger = LedgerSnapshot.from_json(get_json(url + "/stopstorm/ledger")).by_id
                    lag1 = sim_lag(url)
                    row: dict[str, Any] = {"stack": label, "streams": n, "stop": stop, "cpu_pct": 100 * cpu / wall,
                                           "sim_step_lag_s": None if lag0 is None or lag1 is None else lag1 - lag0,
                                           "self_monitor": monitor.summary(),
                                           "failures": sum(1 for r in records if r.error)}
                    if stop:
                        row.update(stop_latency(records, ledger))
                        sl = row
                        print(f"  {label:12s} N={n:4d} stop: stop→close p50 {ms(pct(sl['stop_to_close'], .5))} "
                              f"p99 {ms(pct(sl['stop_to_close'], .99))} ms; stop→server saw it p50 "
                              f"{ms(pct(sl['stop_to_disconnect_seen'], .5))} p99 "
                              f"{ms(pct(sl['stop_to_disconnect_seen'], .99))} ms", flush=True)
                    else:
                        loop = "bridge" if is_async(stack) else "hub"
                        row.update(timing_errors(records, ledger, monitor))
                        hub = row["self_monitor"][f"{loop}_lag"] or {}
                        print(f"  {label:12s} N={n:4d} TTFT err p50 {ms(pct(row['ttft_err'], .5))} p99 "
                              f"{ms(pct(row['ttft_err'], .99))} max {ms(pct(row['ttft_err'], 1))} ms (unflagged p99 "
                              f"{ms(pct(row['ttft_err_unflagged'], .99))}, flagged "
                              f"{len(row['ttft_err']) - len(row['ttft_err_unflagged'])}); chunk err p99 "
                              f"{ms(pct(row['chunk_err'], .99))}; ITL err p99 {ms(pct(row['itl_err'], .99))} ms; "
                              f"ingress p50 {ms(pct(row['ingress'], .5))} p99 {ms(pct(row['ingress'], .99))} ms; "
                              f"client CPU {row['cpu_pct']:.0f} %, loop lag p99 {hub.get('p99_ms')} ms; "
                              f"sim lag {row['sim_step_lag_s']}", flush=True)
                    rows.append(row)
    finally:
        socket_stamps.RECEIVE_STAMPS = True
        sim.stop()

    print("\n| stack | streams | TTFT err p50 / p99 / max ms | chunk err p99 ms | ITL err p99 ms | "
          "ingress p50 / p99 ms | "
          "stop→close p50 / p99 ms | stop→server saw p50 / p99 ms | client CPU % | loop lag p99 ms | "
          "TTFT flagged | TTFT err p99 unflagged ms |")
    print("|---|---:|---|---:|---:|---|---|---|---:|---:|---:|---:|")
    for label in labels:
        for n in args.streams:
            t = next(r for r in rows if r["stack"] == label and r["streams"] == n and not r["stop"])
            s = next(r for r in rows if r["stack"] == label and r["streams"] == n and r["stop"])
            lag = t["self_monitor"]["bridge_lag" if is_async(label.removesuffix(READ_CLOCK)) else "hub_lag"] or {}
            print(f"| {label} | {n} | {ms(pct(t['ttft_err'], .5))} / {ms(pct(t['ttft_err'], .99))} / "
                  f"{ms(pct(t['ttft_err'], 1))} | {ms(pct(t['chunk_err'], .99))} | {ms(pct(t['itl_err'], .99))} | "
                  f"{ms(pct(t['ingress'], .5))} / {ms(pct(t['ingress'], .99))} | "
                  f"{ms(pct(s['stop_to_close'], .5))} / {ms(pct(s['stop_to_close'], .99))} | "
                  f"{ms(pct(s['stop_to_disconnect_seen'], .5))} / {ms(pct(s['stop_to_disconnect_seen'], .99))} | "
                  f"{t['cpu_pct']:.0f} | {lag.get('p99_ms')} | {len(t['ttft_err']) - len(t['ttft_err_unflagged'])}"
                  f"/{len(t['ttft_err'])} | {ms(pct(t['ttft_err_unflagged'], .99))} |")
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        from results_doc import document, dumps  # beside this script
        from results_doc import table as results_table

        def p_ms(values: list[float], p: float) -> float | None:
            v = pct(values, p)
            return None if v is None else v * 1e3

        table_rows = []
        for label in labels:
            for n in args.streams:
                t = next(r for r in rows if r["stack"] == label and r["streams"] == n and not r["stop"])
                s = next(r for r in rows if r["stack"] == label and r["streams"] == n and r["stop"])
                lag = t["self_monitor"]["bridge_lag" if is_async(label.removesuffix(READ_CLOCK)) else "hub_lag"] or {}
                table_rows.append({
                    "stack": label, "streams": n, "ttft_err_p50_ms": p_ms(t["ttft_err"], .5),
                    "ttft_err_p99_ms": p_ms(t["ttft_err"], .99), "ttft_err_max_ms": p_ms(t["ttft_err"], 1),
                    "chunk_err_p99_ms": p_ms(t["chunk_err"], .99), "itl_err_p99_ms": p_ms(t["itl_err"], .99),
                    "ingress_p50_ms": p_ms(t["ingress"], .5), "ingress_p99_ms": p_ms(t["ingress"], .99),
                    "stop_to_close_p50_ms": p_ms(s["stop_to_close"], .5),
                    "stop_to_close_p99_ms": p_ms(s["stop_to_close"], .99),
                    "stop_to_server_p50_ms": p_ms(s["stop_to_disconnect_seen"], .5),
                    "stop_to_server_p99_ms": p_ms(s["stop_to_disconnect_seen"], .99),
                    "client_cpu_pct": t["cpu_pct"], "loop_lag_p99_ms": lag.get("p99_ms"),
                    "ttft_flagged": len(t["ttft_err"]) - len(t["ttft_err_unflagged"]),
                    "ttft_measured": len(t["ttft_err"]),
                    "ttft_err_p99_unflagged_ms": p_ms(t["ttft_err_unflagged"], .99)})
        title = (f"N users at once (started over {args.spread_s:g} s), one {args.tokens}-token stream each through "
                 f"stopstorm's core, against the simulator with --ledger-send-times ({args.step_base_ms:g} ms steps); "
                 f"errors against the ledger's send times; self-monitor bound {args.max_loop_lag_ms:g} ms"
                 + ("; gc.freeze() after the clients were built" if args.gc_freeze else ""))
        doc = document("bench_timing", {"timing": results_table(RESULTS_COLUMNS, table_rows, title)}, rows=rows)
        Path(args.json).write_text(dumps(doc) + "\n")


# The results table's columns (benchmarks/results/bench_timing.json; rendered by benchmarks/render_tables.py).
RESULTS_COLUMNS = [
    {"label": "stack", "key": "stack"},
    {"label": "streams", "key": "streams", "format": "{:,}", "align": "right"},
    {"label": "TTFT err p50 / p99 / max ms", "keys": ["ttft_err_p50_ms", "ttft_err_p99_ms", "ttft_err_max_ms"],
     "sep": " / ", "format": "{:.2f}"},
    {"label": "chunk err p99 ms", "key": "chunk_err_p99_ms", "format": "{:.2f}", "align": "right"},
    {"label": "ITL err p99 ms", "key": "itl_err_p99_ms", "format": "{:.2f}", "align": "right"},
    {"label": "ingress p50 / p99 ms", "keys": ["ingress_p50_ms", "ingress_p99_ms"], "sep": " / ", "format": "{:.2f}"},
    {"label": "stop→close p50 / p99 ms", "keys": ["stop_to_close_p50_ms", "stop_to_close_p99_ms"], "sep": " / ",
     "format": "{:.2f}"},
    {"label": "stop→server saw p50 / p99 ms", "keys": ["stop_to_server_p50_ms", "stop_to_server_p99_ms"],
     "sep": " / ", "format": "{:.2f}"},
    {"label": "client CPU %", "key": "client_cpu_pct", "format": "{:.0f}", "align": "right"},
    {"label": "loop lag p99 ms", "key": "loop_lag_p99_ms", "align": "right"},
    {"label": "TTFT flagged", "keys": ["ttft_flagged", "ttft_measured"], "sep": "/", "align": "right"},
    {"label": "TTFT err p99 unflagged ms", "key": "ttft_err_p99_unflagged_ms", "format": "{:.2f}", "align": "right"},
]


if __name__ == "__main__":
    main()
