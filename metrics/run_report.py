"""The run's abort accounting as a JSON document and as the console table a capacity planner reads.

`to_json` and `format_summary` are pure; `write_report` is the one writer, atomic (temp file + rename) so a
reader never sees half a report.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import orjson

from metrics.accounting import Accounting, Distribution, Figure, Figures
from metrics.record import INTERRUPTED

__all__ = ["REPORT_SCHEMA_VERSION", "figure_json", "format_summary", "to_json", "write_report"]

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
    stopped, failed, failures, aborted, abort_latency, wasted_tokens, zombies, zombie_slot_seconds, queue_wait,
    freed_tokens, freed_slot_seconds, goodput_tokens, goodput_rate, log_aborted, log_abort_latency. Run figures:
    duration, freed_tokens_rate, ledger_aborts, vllm_counted_aborts, blind_spot, log_aborts, unmatched_requests,
    unjoined_streams.

    "meta" blocks (metrics/locust_hooks.py): "partial": false, or true with "partial_reason" (SIGTERM or Ctrl-C
    cut the run: figures cover it until then); "records": {"path", "written"} with --stopstorm-records;
    "metrics": the /metrics scraper's {"url", "interval_s", "scrapes", "errors", "last_error", "window_s"};
    "server_log": the --server-log follower's {"path", "lines", "events", "errors", "last_error"};
    "open_model": {"arrival_rate", "arrivals", "late", "late_s"} with --arrival-rate; "gpu": {"off": why} when
    no GPU source was read; "distributed", only from a Locust master (metrics/distributed.py): {"records": N
    received from workers, "bad_records": N unreadable, "incomplete": [worker ids whose final batch never came,
    or whose count fell short of what they said they sent: died, or never answered], "workers": {ID:
    {"records", "batches", "claimed_sent", "final", "state", "clock_shift_s", "drained": records that came
    after the master asked for the final batches}}}.

    "self_monitor" (metrics/self_monitor.py): the load generator's own health, {PROCESS: SUMMARY} keyed
    "local", "master" or "worker <client id>". SUMMARY: {"pid", "interval_ms", "max_loop_lag_ms", "wall_s",
    "cpu_s", "cpu_pct" (of one core), "bridge_cpu_s" (the asyncio bridge thread's, null without one),
    "hub_lag" and "bridge_lag" ({"count", "p50_ms", "p99_ms", "max_ms", "mean_ms", "lagged" (stalls over the
    bound), "lagged_s"}, null when not sampled), "ttft": {"checked", "flagged"}, "itl": {"checked",
    "flagged"}, "gc": {"collections" (by generation), "pause_total_s", "pause_max_ms"}}; a flagged TTFT or ITL
    gap overlapped a stall of its loop longer than max_loop_lag_ms, so it may hold the tool's own delay.

    "gpu" (metrics/gpu_hooks.py): {"source": "nvml"|"dcgm", "devices": [{"index", "name", "uuid"}],
    "interval_s", "idle_pct", "errors", "last_error", "timeline": {"columns": ["t_s", "gpu", "util_pct",
    "power_w", "energy_j", "mem_used_bytes", "sm_clock_mhz"], "rows": [[...], ...]}, "util_samples":
    {"columns": ["t_s", "gpu", "util_pct"], "rows"} (the driver's own higher-rate samples), "stop_marks_s":
    [...], "files": {"timeline_csv", "stops_csv", "plot_png"}, and the FIGUREs gpu_busy_seconds (GPU-s),
    energy (J), mean_power (W), energy_per_delivered_token (J/token), wasted_gpu_seconds (GPU-s), wasted_energy
    (J), idle_stops (stops), stop_to_idle (distribution, s); and "cells": [{"stack", "close_mode",
    "wasted_gpu_seconds", "wasted_energy", "idle_stops", "stop_to_idle"}] (each a FIGURE), one per stack ×
    close mode of the report's "cells". t_s is seconds since the run's start (the opening reading may be a few
    ms before 0); energy_j counts from each GPU's first reading; a reading the GPU does not give is null. The
    rules behind the figures are in metrics/gpu_attribution.py.

    "capacity" (metrics/capacity_section.py): {"max_num_seqs", "timeline": {"columns": ["t_s", "running",
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


# --- the console table -----------------------------------------------------------------------------------------


def _num(f: Figure, scale: float = 1.0, digits: int = 0) -> str:
    if not isinstance(f.value, int | float):
        return "–"
    v = f.value * scale
    return f"{v:,.{digits}f}"


def _pct(f: Figure, which: str, scale: float = 1e3, digits: int = 1) -> str:
    if not isinstance(f.value, Distribution):
        return "–"
    return f"{getattr(f.value, which) * scale:,.{digits}f}"


_COLUMNS = ("stack", "close mode", "streams", "stopped", "aborted", "abort p50 ms", "abort p99 ms",
            "wasted tok", "zombies", "zombie slot-s")


def _row(stack: str, mode: str, f: Figures) -> tuple[str, ...]:
    return (stack, mode, _num(f.streams), _num(f.stopped), _num(f.aborted), _pct(f.abort_latency, "p50"),
            _pct(f.abort_latency, "p99"), _num(f.wasted_tokens), _num(f.zombies),
            _num(f.zombie_slot_seconds, digits=2))


def format_summary(accounting: Accounting) -> str:
    """Per stack × close mode what Stop cost the server, then the run-wide figures, with their sources."""
    rows = [_COLUMNS] + [_row(c.stack, c.close_mode, c.figures) for c in accounting.cells]
    rows.append(_row("all", "all", accounting.overall))
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))

    out = [line(rows[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:-1]]
    out += ["  ".join("-" * w for w in widths), line(rows[-1]), ""]

    o, run = accounting.overall, accounting.run
    wasted_src = o.wasted_tokens.source + (f" ({o.wasted_tokens.note})" if o.wasted_tokens.note else "")
    qw = o.queue_wait
    out.append(f"truth: {', '.join(accounting.sources)}; zombie = stopped stream still holding a slot "
               f"{accounting.zombie_grace_s:g} s after Stop")
    lat_src = o.abort_latency.source + (f" ({o.abort_latency.note})" if o.abort_latency.note else "")
    out.append(f"aborted: {o.aborted.source}; abort latency: {lat_src}; zombies, freed: {o.zombies.source}; "
               f"wasted tokens: {wasted_src}")
    out.append(f"queue wait p50 / p95:   {_pct(qw, 'p50')} / {_pct(qw, 'p95')} ms  [{qw.source}]")
    out.append(f"goodput:                {_num(o.goodput_rate, digits=1)} tok/s "
               f"({_num(o.goodput_tokens)} tokens read in {_num(run.duration, digits=1)} s)  [{o.goodput_rate.source}]")
    out.append(f"freed by aborts:        {_num(o.freed_tokens)} tokens, {_num(o.freed_slot_seconds, digits=2)} "
               f"slot-s ({_num(run.freed_tokens_rate, digits=1)} tok/s) vs every stopped stream run to its end  "
               f"[{o.freed_tokens.source}]")
    if run.blind_spot.known:
        out.append(f"vLLM blind spot:        {run.blind_spot.value}  "
                   f"[{run.blind_spot.source} vs {run.vllm_counted_aborts.source}]")
    else:
        aborts = _num(run.ledger_aborts)
        out.append(f"vLLM blind spot:        {aborts} aborts in the ledger; vLLM's count unknown (no /metrics delta)"
                   if run.ledger_aborts.known else "vLLM blind spot:        unknown (needs the ledger and /metrics)")
    failures = o.failures.value
    if isinstance(failures, dict) and failures:
        cut = failures.get(INTERRUPTED, 0)
        failed = {text: n for text, n in failures.items() if text != INTERRUPTED}
        if failed:
            out.append("failed streams:")
            out += [f"  {n:>6}  {text}" for text, n in sorted(failed.items(), key=lambda kv: -kv[1])]
        if cut:
            out.append(f"cut by the run's end:   {cut} stream{'s' if cut != 1 else ''} (recorded, not failures)")
    extra = [f"{name.replace('_', ' ')}: {_num(f)}" for name, f in (("unmatched_requests", run.unmatched_requests),
                                                                   ("unjoined_streams", run.unjoined_streams))
             if isinstance(f.value, int) and f.value]
    if extra:
        out.append("; ".join(extra))
    if o.log_aborted.known and o.log_aborted.source != o.aborted.source:
        lat = o.log_abort_latency
        out.append(f"vLLM log:               {_num(o.log_aborted)} stopped streams' aborts logged; Stop → abort "
                   f"logged p50 / p99 {_pct(lat, 'p50')} / {_pct(lat, 'p99')} ms  [{o.log_aborted.source}]")
    return "\n".join(out)
