"""Replay versus real A/B runs: does the counterfactual replay predict what a second run would measure?

    python benchmarks/bench_replay.py [--requests 300] [--rate 5.5] [--max-num-seqs 4] [--json out.json]

One open-model schedule (Poisson arrivals, an unstopped length per request, a stop point for `--stop-probability`
of them) is run twice, side by side in the same seconds, against two fresh simulators (`EmbeddedSimulator`, each
its own process) by a raw asyncio client that sends each request at its scheduled time:

- run A: every stopped stream is closed the moment its Stop token arrives (prompt aborts);
- run B: every stream is read to its end (no stops).

Then run A's ledger alone (plus the step time calibrated from it) is replayed (metrics/analysis/replay.py) under the
`perfect` policy (should reproduce A) and the `full` policy (predicts B). The table compares each prediction
with the real run's ledger (server truth): queue wait p50/p95/mean, TTFT p50, generated tokens, slot-seconds,
makespan. Loopback only; each run is bounded by the schedule plus `--grace` seconds; simulators stop by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stopstorm.metrics.analysis.replay import ReplayResult, calibrate, replay, trace_from_ledger
from stopstorm.metrics.figures import distribution
from stopstorm.metrics.truth.ledger import LedgerSnapshot
from stopstorm.simulator.launcher import EmbeddedSimulator

_USAGE = re.compile(rb'"completion_tokens":(\d+)')


@dataclass(frozen=True, slots=True)
class Planned:
    rid: str
    at: float  # seconds after the schedule starts
    max_tokens: int
    stop_after: int | None  # close after this many tokens (run A only)


def schedule(n: int, rate: float, lengths: tuple[int, int], stop_probability: float, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for k in range(n):
        t += rng.expovariate(rate)
        m = rng.randint(*lengths)
        stop = rng.randint(1, m - 1) if rng.random() < stop_probability and m > 1 else None
        out.append(Planned(f"replay-{seed}-{k}", t, m, stop))
    return out


async def _one(host: str, port: int, p: Planned, stops: bool) -> None:
    body = json.dumps({"model": "llm", "messages": [{"role": "user", "content": "Tell me a story."}],
                       "stream": True, "max_tokens": p.max_tokens, "ignore_eos": True,
                       "stream_options": {"include_usage": True, "continuous_usage_stats": True}}).encode()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
                  f"x-request-id: {p.rid}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body)
    try:
        while True:
            line = await reader.readline()
            if not line or b"[DONE]" in line:
                return
            if stops and p.stop_after is not None and line.startswith(b"data: "):
                m = _USAGE.search(line)
                if m and int(m.group(1)) >= p.stop_after:
                    return  # Stop: close now (the finally below)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _drive(url: str, plan: list[Planned], stops: bool, limit_s: float) -> None:
    host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
    t0 = time.monotonic()
    tasks = []
    for p in plan:
        delay = t0 + p.at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(host, int(port), p, stops)))
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=limit_s)


def _run(coro: Any) -> None:
    try:
        import uvloop
        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def _ledger_once_freed(url: str) -> LedgerSnapshot:
    """The simulator's ledger once every request has left the engine (or 10 s have passed)."""
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(f"{url}/stopstorm/ledger", timeout=5) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
        if all(e.get("freed") is not None for e in doc["requests"]) or time.monotonic() > deadline:
            return LedgerSnapshot.from_json(doc)


def _sim_args(max_num_seqs: int, step_ms: float) -> list[str]:
    return ["--max-num-seqs", str(max_num_seqs), "--step-base-ms", str(step_ms)]


def step_lag_share(url: str) -> float:
    """How far behind its own step-time model the simulator ran: the sum of its steps' lateness over the sum of
    their modelled durations (`stopstorm_sim:step_lag_seconds` / `step_modelled_seconds` in its /metrics). A
    process starved of CPU (a hog on a shared host) ends steps late at random moments: queueing the replay's
    model of an on-time server cannot reproduce."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    modelled = values.get("stopstorm_sim:step_modelled_seconds_total", 0.0)
    return values.get("stopstorm_sim:step_lag_seconds_total", 0.0) / modelled if modelled else 0.0


def run_pair(plan: list[Planned], max_num_seqs: int, step_ms: float, grace: float,
             lags: list[float] | None = None) -> tuple[LedgerSnapshot, LedgerSnapshot]:
    """Runs A (stops) and B (no stops) side by side, each against its own fresh simulator, in the same seconds.

    Run one after the other, the two runs met different machines: on a shared host a few percent of step-time
    drift between them moves a near-saturated queue wait by ten percent, and the replay (which has only A's
    timing) was charged with the host's drift. Side by side, both servers step through the same noise, so A's
    calibrated step is B's too and the comparison measures the replay alone."""
    with EmbeddedSimulator(_sim_args(max_num_seqs, step_ms)) as sa, \
            EmbeddedSimulator(_sim_args(max_num_seqs, step_ms)) as sb:
        limit = plan[-1].at + grace

        async def both() -> None:
            await asyncio.gather(_drive(sa.url or "", plan, True, limit), _drive(sb.url or "", plan, False, limit))

        _run(both())
        pair = _ledger_once_freed(sa.url or ""), _ledger_once_freed(sb.url or "")
        if lags is not None:  # each simulator's step lag share (step_lag_share), A's then B's
            lags.extend(step_lag_share(sim.url or "") for sim in (sa, sb))
        return pair


def measured(ledger: LedgerSnapshot) -> dict[str, float]:
    """The same figures as a replay gives, from a real run's ledger (server truth)."""
    es = ledger.served
    t0 = min(e.arrival for e in es)
    qw = distribution(e.queue_wait for e in es if e.queue_wait is not None)
    ttft = distribution(e.first_token - e.arrival for e in es if e.first_token is not None)
    assert qw is not None and ttft is not None
    return {"queue wait p50 s": qw.p50, "queue wait p95 s": qw.p95, "queue wait mean s": qw.mean,
            "TTFT p50 s": ttft.p50, "generated tokens": sum(e.generated_tokens for e in es),
            "slot-seconds": sum(e.freed - e.scheduled for e in es if e.scheduled and e.freed),
            "makespan s": max(e.freed for e in es if e.freed) - t0}


def predicted(r: ReplayResult) -> dict[str, float]:
    assert r.queue_wait is not None and r.ttft is not None
    return {"queue wait p50 s": r.queue_wait.p50, "queue wait p95 s": r.queue_wait.p95,
            "queue wait mean s": r.queue_wait.mean, "TTFT p50 s": r.ttft.p50,
            "generated tokens": r.generated_tokens, "slot-seconds": r.slot_seconds, "makespan s": r.makespan_s}


def replay_speed(hours: float = 1.0, rate: float = 10.0, max_num_seqs: int = 32) -> str:
    """CPU seconds to replay `hours` of synthetic open-model traffic per policy (no server involved)."""
    from stopstorm.metrics.analysis.replay import ReplayRequest, StepTiming

    rng = random.Random(0)
    t, trace = 0.0, []
    while t < hours * 3600:
        t += rng.expovariate(rate)
        m = rng.randint(20, 400)
        stop = rng.randint(1, m - 1) if rng.random() < 0.5 else None
        trace.append(ReplayRequest(str(len(trace)), t, 100, m, stop, stop))
    out = []
    for policy in ("perfect", "full"):
        c = time.process_time()
        r = replay(trace, StepTiming(0.015, 0.00005), max_num_seqs, policy)
        out.append(f"{policy} {time.process_time() - c:.1f} s CPU ({r.makespan_s / 3600:.2f} h of virtual time)")
    head = f"replay speed, {hours:g} h of traffic ({len(trace):,} requests, {rate:g}/s, max_num_seqs {max_num_seqs})"
    return f"{head}: " + ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rate", type=float, default=5.5, help="Poisson arrivals per second (default 5.5)")
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--step-ms", type=float, default=10.0)
    ap.add_argument("--lengths", type=int, nargs=2, default=(10, 120), help="unstopped length range (tokens)")
    ap.add_argument("--stop-probability", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--grace", type=float, default=60.0, help="seconds past the last arrival a run may take")
    ap.add_argument("--json", default="", help="also write the table as JSON here")
    ap.add_argument("--speed-only", action="store_true", help="only time the replay of an hour of traffic")
    a = ap.parse_args()
    if a.speed_only:
        print(replay_speed())
        return
    plan = schedule(a.requests, a.rate, tuple(a.lengths), a.stop_probability, a.seed)
    t = time.monotonic()
    real_a, real_b = run_pair(plan, a.max_num_seqs, a.step_ms, a.grace)
    wall = time.monotonic() - t
    t = time.perf_counter()
    timing = calibrate(real_a)
    trace = trace_from_ledger(real_a)
    perfect = replay(trace, timing, a.max_num_seqs, "perfect")
    full = replay(trace, timing, a.max_num_seqs, "full")
    cpu = time.perf_counter() - t
    rows = []
    for name, real, pred in (("A: prompt aborts", measured(real_a), predicted(perfect)),
                             ("B: no stops", measured(real_b), predicted(full))):
        for k, v in real.items():
            p = pred[k]
            rows.append({"run": name, "figure": k, "real": v, "replay": p,
                         "error_pct": (p - v) / v * 100 if v else None})
    saved_real = measured(real_b)["queue wait mean s"] - measured(real_a)["queue wait mean s"]
    saved_pred = predicted(full)["queue wait mean s"] - predicted(perfect)["queue wait mean s"]
    print(f"{a.requests} requests, Poisson {a.rate}/s, max_num_seqs {a.max_num_seqs}, step {a.step_ms} ms, "
          f"lengths {a.lengths[0]}-{a.lengths[1]}, stop probability {a.stop_probability}, seed {a.seed}")
    print(f"calibrated step {timing.base_s * 1e3:.3f} ms + {timing.per_seq_s * 1e3:.3f} ms per running request, "
          f"prefill {timing.prefill_per_token_s * 1e6:.2f} µs/token "
          f"({timing.source}); real runs {wall:.0f} s wall, both replays {cpu * 1e3:.0f} ms CPU\n")
    print("| run | figure | real (ledger) | replay from run A | error |\n|---|---|---:|---:|---:|")
    for r in rows:
        err = "–" if r["error_pct"] is None else f"{r['error_pct']:+.1f} %"
        print(f"| {r['run']} | {r['figure']} | {r['real']:,.3f} | {r['replay']:,.3f} | {err} |")
    print(f"\nqueue wait saved by prompt aborts (mean): real A/B {saved_real:.3f} s, replay {saved_pred:.3f} s")
    if a.json:
        from results_doc import document, dumps  # beside this script
        from results_doc import table as results_table

        table_rows = [{**r, "_format": {"real": "{:,.0f}", "replay": "{:,.0f}"}} if r["figure"] == "generated tokens"
                      else r for r in rows]
        title = (f"One open-model schedule ({a.requests} requests, Poisson {a.rate:g}/s, lengths uniform "
                 f"{a.lengths[0]}-{a.lengths[1]}, stop probability {a.stop_probability:g}) run twice against fresh "
                 f"simulators (--max-num-seqs {a.max_num_seqs}, {a.step_ms:g} ms steps): A closes at Stop, B reads "
                 "every stream to its end; run A's ledger alone, replayed, predicts A (perfect) and B (full)")
        figures = [
            {"id": "saved_real", "label": "queue wait saved by prompt aborts (mean), real A/B",
             "value": round(saved_real, 3), "unit": "s"},
            {"id": "saved_replay", "label": "queue wait saved by prompt aborts (mean), replay",
             "value": round(saved_pred, 3), "unit": "s"},
            {"id": "replay_cpu", "label": "CPU for both replays", "value": round(cpu * 1e3), "unit": "ms"},
            {"id": "calibrated_step_base", "label": "calibrated step: base, per running request",
             "value": f"{timing.base_s * 1e3:.3f} + {timing.per_seq_s * 1e3:.3f}", "unit": "ms"},
        ]
        doc = document("bench_replay", {"ab": results_table(RESULTS_COLUMNS, table_rows, title)}, figures,
                       rows=rows, saved_real_s=saved_real, saved_replay_s=saved_pred,
                       timing={"base_s": timing.base_s, "per_seq_s": timing.per_seq_s,
                               "prefill_per_token_s": timing.prefill_per_token_s})
        Path(a.json).write_text(dumps(doc) + "\n")


# The results table's columns (benchmarks/results/bench_replay.json; rendered by benchmarks/render_tables.py).
RESULTS_COLUMNS = [
    {"label": "run", "key": "run"},
    {"label": "figure", "key": "figure"},
    {"label": "real (ledger)", "key": "real", "format": "{:,.3f}", "align": "right"},
    {"label": "replay from run A", "key": "replay", "format": "{:,.3f}", "align": "right"},
    {"label": "error", "key": "error_pct", "format": "{:+.1f} %", "align": "right"},
]


if __name__ == "__main__":
    main()
