"""The run's report as a JSON document: its schema, and the one writer (atomic: temp file + rename, so a reader
never sees half a report). `to_json` is pure."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import orjson

from stopstorm.metrics.analysis.accounting import Accounting, Figures
from stopstorm.metrics.figures import Distribution, Figure

__all__ = ["REPORT_SCHEMA_VERSION", "figure_json", "to_json", "write_report"]

REPORT_SCHEMA_VERSION = 2


def figure_json(f: Figure) -> dict[str, Any]:
    value = f.value.to_json() if isinstance(f.value, Distribution) else f.value
    out: dict[str, Any] = {"value": value, "unit": f.unit, "source": f.source}
    if f.note is not None:
        out["note"] = f.note
    return out


def _figures(figures: Figures) -> dict[str, dict[str, Any]]:
    return {name: figure_json(f) for name, f in figures.items()}


def to_json(accounting: Accounting, meta: dict[str, Any]) -> dict[str, Any]:
    """The report document. Layout (schema_version 2):

        {"schema_version": 2,
         "meta": {...},                      # the caller's: host, options, library versions, times, and the
                                             #   blocks listed under "meta" below
         "sources": ["client records", "simulator ledger", ...],   # the truths this run had
         "zombie_grace_s": 0.1,
         "cells": [{"stack": "requests", "close_mode": "close", "figures": {NAME: FIGURE, ...}}, ...],
         "overall": {"figures": {NAME: FIGURE, ...}},
         "run": {"figures": {NAME: FIGURE, ...}},
         "self_monitor": {...},              # always (from Locust runs); sections below
         "gpu": {...},                       # when a GPU source was read
         "capacity": {...}}                  # when the simulator's ledger was read

    Every FIGURE is {"value", "unit", "source"} plus an optional "note". "value" is a number, a string (a
    finding), an object of counts by error text (`failures`), an object {"count", "p50", "p90", "p95", "p99",
    "max", "mean"} for a distribution, or null when its truth was unavailable (source "unavailable"); never 0
    for unknown. Times are seconds, slot time slot-seconds (`slot-s`). Cell and overall figures: streams,
    stopped, failed, failures, interrupted (streams the run's end cut short: neither in failed nor in failures),
    aborted, abort_latency, wasted_tokens, zombies, zombie_slot_seconds, queue_wait, freed_tokens,
    freed_slot_seconds, goodput_tokens, goodput_rate, log_aborted, log_abort_latency. Run figures:
    duration, freed_tokens_rate, ledger_aborts, vllm_counted_aborts, blind_spot, log_aborts, unmatched_requests,
    unjoined_streams.

    "meta" blocks (metrics/plugin/hooks.py): "partial": false, or true with "partial_reason" (SIGTERM or Ctrl-C
    cut the run: figures cover it until then); "records": {"path", "written"} with --stopstorm-records;
    "metrics": the /metrics scraper's {"url", "interval_s", "scrapes", "errors", "last_error", "window_s"};
    "server_log": the --server-log follower's {"path", "lines", "events", "errors", "last_error"};
    "open_model": {"arrival_rate", "arrivals", "late", "late_s"} with --arrival-rate; "gpu": {"off": why} when
    no GPU source was read; "distributed", only from a Locust master (metrics/plugin/distributed.py): {"records": N
    received from workers, "bad_records": N unreadable, "incomplete": [worker ids whose final batch never came,
    or whose count fell short of what they said they sent: died, or never answered], "workers": {ID:
    {"records", "batches", "claimed_sent", "final", "state", "clock_shift_s", "drained": records that came
    after the master asked for the final batches}}}.

    "self_monitor" (metrics/plugin/self_monitor.py): the load generator's own health, {PROCESS: SUMMARY} keyed
    "local", "master" or "worker <client id>". SUMMARY: {"pid", "interval_ms", "max_loop_lag_ms", "wall_s",
    "cpu_s", "cpu_pct" (of one core), "bridge_cpu_s" (the asyncio bridge thread's, null without one),
    "hub_lag" and "bridge_lag" ({"count", "p50_ms", "p99_ms", "max_ms", "mean_ms", "lagged" (stalls over the
    bound), "lagged_s"}, null when not sampled), "ttft": {"checked", "flagged"}, "itl": {"checked",
    "flagged"}, "gc": {"collections" (by generation), "pause_total_s", "pause_max_ms"}}; a flagged TTFT or ITL
    gap overlapped a stall of its loop longer than max_loop_lag_ms, so it may hold the tool's own delay.

    "gpu" (metrics/plugin/gpu.py): {"source": "nvml"|"dcgm", "devices": [{"index", "name", "uuid"}],
    "interval_s", "idle_pct", "errors", "last_error", "timeline": {"columns": ["t_s", "gpu", "util_pct",
    "power_w", "energy_j", "mem_used_bytes", "sm_clock_mhz"], "rows": [[...], ...]}, "util_samples":
    {"columns": ["t_s", "gpu", "util_pct"], "rows"} (the driver's own higher-rate samples), "stop_marks_s":
    [...], "files": {"timeline_csv", "stops_csv", "plot_png"}, and the FIGUREs gpu_busy_seconds (GPU-s),
    energy (J), mean_power (W), energy_per_delivered_token (J/token), wasted_gpu_seconds (GPU-s), wasted_energy
    (J), idle_stops (stops), stop_to_idle (distribution, s); and "cells": [{"stack", "close_mode",
    "wasted_gpu_seconds", "wasted_energy", "idle_stops", "stop_to_idle"}] (each a FIGURE), one per stack ×
    close mode of the report's "cells". t_s is seconds since the run's start (the opening reading may be a few
    ms before 0); energy_j counts from each GPU's first reading; a reading the GPU does not give is null. The
    rules behind the figures are in metrics/analysis/gpu_attribution.py.

    "capacity" (metrics/analysis/capacity.py): {"max_num_seqs", "timeline": {"columns": ["t_s", "running",
    "waiting"], "rows": [...]} (t_s since the run's start), "queue_wait_samples_s": [sorted seconds], "ttft",
    "generated_tokens", "throughput" (FIGUREs, TTFT server side: arrival → first token), "replay": {"source",
    "step_timing": {"base_s", "per_seq_s", "prefill_per_token_s", "source"}, "policies":
    {"recorded"|"perfect"|"full": {"requests", "makespan_s", "generated_tokens", "delivered_tokens",
    "wasted_tokens", "slot_seconds", "throughput_tok_s", "goodput_tok_s", "queue_wait", "ttft"}},
    "queue_wait_saved_s": {"p50", "p95", "p99", "mean"}, "slot_seconds_freed", "tokens_freed", "trace":
    {"columns": ["t_s", "prompt_tokens", "target_tokens", "stop_tokens", "aborted_at_tokens"], "rows": [...]},
    "horizon_s"} (or {"source", "error"} when the replay could not run)}.

    Versions: 1, the accounting (cells, overall, run) and meta; 2 adds "self_monitor", "gpu", "capacity" and
    the meta blocks "partial", "records", "open_model", "gpu" and "distributed". Every version-1 field keeps its
    meaning, so a version-1 reader reads a version-2 report.
    """
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "meta": meta,
        "sources": list(accounting.sources),
        "zombie_grace_s": accounting.zombie_grace_s,
        "cells": [{"stack": c.stack, "close_mode": c.close_mode, "figures": _figures(c.figures)}
                  for c in accounting.cells],
        "overall": {"figures": _figures(accounting.overall)},
        "run": {"figures": {name: figure_json(f) for name, f in accounting.run.items()}},
    }


def write_report(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Write `doc` as JSON to `path` atomically: a temp file beside it, then a rename over it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(doc, default=str, option=orjson.OPT_INDENT_2))
            fh.write(b"\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
