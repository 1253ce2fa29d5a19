"""`stopstorm replay REPORT.json`: a saved run's trace replayed under every abort policy, as a table.

The replay itself is pure (stopstorm/metrics/analysis/replay.py); this is its console view over a report's
`capacity.replay` section, with another `max_num_seqs` or step time if asked ("what if").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson

from stopstorm.metrics.analysis.replay import POLICIES, StepTiming, replay, trace_from_rows

__all__ = ["main"]

def main(argv: Sequence[str] | None = None) -> int:
    """`stopstorm replay REPORT.json [--max-num-seqs K] [--step-ms S]`: what if, from a saved run."""
    ap = argparse.ArgumentParser(prog="stopstorm replay",
                                 description="Replay a run's saved trace (its report's capacity.replay section) "
                                 "under each abort policy, optionally with another max_num_seqs or step time.")
    ap.add_argument("report", help="a stopstorm report JSON written against the simulator")
    ap.add_argument("--max-num-seqs", type=int, default=0, help="running slots (default: the run's)")
    ap.add_argument("--step-ms", type=float, default=0.0, help="engine step base in ms (default: calibrated)")
    args = ap.parse_args(argv)
    try:
        doc = orjson.loads(Path(args.report).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise SystemExit(f"stopstorm replay: cannot read report {args.report}: {exc}") from None
    cap = doc.get("capacity") or {}
    rep = cap.get("replay") or {}
    if not (rep.get("trace") or {}).get("rows"):
        raise SystemExit(f"stopstorm replay: {args.report} has no capacity.replay.trace (a run against the simulator "
                         "writes one)")
    t = rep["step_timing"]
    timing = StepTiming(args.step_ms / 1e3 if args.step_ms else t["base_s"], t.get("per_seq_s", 0.0),
                        t.get("prefill_per_token_s", 0.0), "given" if args.step_ms else t.get("source", ""))
    k = args.max_num_seqs or int(cap.get("max_num_seqs") or 0)
    if k < 1:
        raise SystemExit("stopstorm replay: --max-num-seqs is needed (the report does not say the run's)")
    trace = trace_from_rows(rep["trace"]["rows"])
    print(f"{len(trace)} requests, max_num_seqs {k}, step {timing.base_s * 1e3:.3f} ms "
          f"+ {timing.per_seq_s * 1e3:.3f} ms per running request")
    print("| policy | queue wait p50 s | p95 s | mean s | TTFT p50 s | generated | wasted | slot-s | goodput tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for policy in POLICIES:
        r = replay(trace, timing, k, policy, horizon=rep.get("horizon_s"), keep_timeline=False)
        q, f = r.queue_wait, r.ttft
        print(f"| {policy} | {q.p50 if q else float('nan'):.3f} | {q.p95 if q else float('nan'):.3f} | "
              f"{q.mean if q else float('nan'):.3f} | {f.p50 if f else float('nan'):.3f} | {r.generated_tokens:,} | "
              f"{r.wasted_tokens:,} | {r.slot_seconds:,.2f} | {r.goodput:,.1f} |")
    sys.stdout.flush()
    return 0

