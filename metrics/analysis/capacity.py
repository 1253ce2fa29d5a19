"""The report's `capacity` section: the server's shape over the run, and what early aborts saved, from one run.

Abort accounting (metrics/analysis/accounting.py) says what each Stop cost; a capacity planner also needs the run's
load shape (running and waiting requests over time), the raw queue waits (for a CDF), TTFT and throughput,
and the counterfactual "what did early aborts buy us?". All of it comes from the simulator's ledger (server
truth): the timeline is rebuilt from each request's arrival, scheduling and freeing marks, and the
counterfactual is the ledger replayed (metrics/analysis/replay.py) with perfect aborts and with none. Pure functions; a
run without a ledger (real vLLM) gets no section.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from stopstorm.metrics.analysis.accounting import ledger_occupancy, served_entries
from stopstorm.metrics.analysis.replay import TRACE_COLUMNS, Counterfactuals, replay_counterfactuals, trace_to_rows
from stopstorm.metrics.figures import LEDGER_SOURCE, distribution
from stopstorm.metrics.record import StreamRecord

__all__ = ["capacity_section", "ledger_timeline"]

_REPLAY_SOURCE = "replay of the simulator ledger (metrics/analysis/replay.py)"


def ledger_timeline(entries: Iterable[Mapping[str, Any]], t0: float) -> list[list[float]]:
    """[[t_s, running, waiting], …] at every change, t_s seconds after `t0`, from the ledger's marks."""
    return [[round(t - t0, 6), running, waiting] for t, running, waiting in ledger_occupancy(entries)]


def _replay_json(cf: Counterfactuals) -> dict[str, Any]:
    results, timing = cf.results, cf.timing
    perfect, full = results.get("perfect"), results.get("full")
    out: dict[str, Any] = {
        "source": _REPLAY_SOURCE,
        "step_timing": {"base_s": timing.base_s, "per_seq_s": timing.per_seq_s,
                        "prefill_per_token_s": timing.prefill_per_token_s, "source": timing.source},
        "policies": {name: r.to_json() for name, r in results.items()},
        # What the replay ran on, so `stopstorm replay REPORT` can ask "what if" later.
        "trace": {"columns": list(TRACE_COLUMNS), "rows": trace_to_rows(cf.trace)},
        "horizon_s": cf.horizon,
    }
    if perfect is not None and full is not None and perfect.queue_wait and full.queue_wait:
        out["queue_wait_saved_s"] = {q: getattr(full.queue_wait, q) - getattr(perfect.queue_wait, q)
                                     for q in ("p50", "p95", "p99", "mean")}
        out["slot_seconds_freed"] = full.slot_seconds - perfect.slot_seconds
        out["tokens_freed"] = full.generated_tokens - perfect.generated_tokens
    return out


def capacity_section(ledger_doc: Mapping[str, Any] | None, records: Iterable[StreamRecord], run_start: float,
                     duration_s: float, max_num_seqs: int | None) -> dict[str, Any] | None:
    """The `capacity` section of the report, or None without a ledger. See metrics/report/document.py's schema."""
    if ledger_doc is None:
        return None
    entries = served_entries(ledger_doc)
    qw = sorted(q for e in entries if (q := e.get("queue_wait")) is not None)
    ttft = distribution(e["first_token"] - e["arrival"] for e in entries if e.get("first_token") is not None)
    generated = sum(int(e.get("generated_tokens") or 0) for e in entries)
    section: dict[str, Any] = {
        "max_num_seqs": max_num_seqs,
        "timeline": {"columns": ["t_s", "running", "waiting"], "rows": ledger_timeline(entries, run_start),
                     "source": LEDGER_SOURCE},
        "queue_wait_samples_s": qw,
        "ttft": {"value": ttft.to_json() if ttft else None, "unit": "s", "source": LEDGER_SOURCE,
                 "note": "server side: arrival → first token"},
        "generated_tokens": {"value": generated, "unit": "tokens", "source": LEDGER_SOURCE},
        "throughput": {"value": generated / duration_s if duration_s > 0 else None, "unit": "tokens/s",
                       "source": LEDGER_SOURCE},
    }
    if max_num_seqs and entries:
        try:
            cf = replay_counterfactuals(ledger_doc, max_num_seqs, list(records), run_end=run_start + duration_s)
        except ValueError as exc:
            section["replay"] = {"source": _REPLAY_SOURCE, "error": str(exc)}
        else:
            section["replay"] = _replay_json(cf)
    return section
