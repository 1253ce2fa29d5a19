"""The report's `capacity` section: the server's shape over the run, and what early aborts saved, from one run.

Abort accounting (metrics/analysis/accounting.py) says what each Stop cost; a capacity planner also needs the
run's load shape (running and waiting requests over time), the raw queue waits (for a CDF), TTFT and
throughput, and the counterfactual "what did early aborts buy us?". All of it comes from the simulator's
ledger (server truth): the timeline is rebuilt from each request's arrival, scheduling and freeing marks, and
the counterfactual is the ledger replayed (metrics/analysis/replay.py) with perfect aborts and with none.
Pure functions; a run without a ledger (real vLLM) gets no section.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from stopstorm.metrics.analysis.accounting import ledger_occupancy
from stopstorm.metrics.analysis.replay import (
    TRACE_COLUMNS,
    Counterfactuals,
    ReplayResult,
    StepTiming,
    replay_counterfactuals,
    trace_to_rows,
)
from stopstorm.metrics.figures import LEDGER_SOURCE, Figure, Table, distribution, unknown
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.ledger import LedgerSnapshot
from stopstorm.simulator.ledger import LedgerEntry

__all__ = ["CapacitySection", "ReplaySection", "capacity_section", "ledger_timeline"]

_REPLAY_SOURCE = "replay of the simulator ledger (metrics/analysis/replay.py)"


@dataclass(frozen=True, slots=True)
class ReplaySection:
    """One run's ledger replayed with perfect aborts, as recorded, and with none (metrics/analysis/replay.py)."""

    source: str
    error: str | None = None  # why the replay could not run (then nothing below)
    step_timing: StepTiming | None = None
    policies: Mapping[str, ReplayResult] = field(default_factory=dict)
    queue_wait_saved_s: Mapping[str, float] | None = None  # full − perfect, by p50/p95/p99/mean
    slot_seconds_freed: float | None = None
    tokens_freed: int | None = None
    trace: Table | None = None
    horizon_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"source": self.source, "error": self.error}
        t = self.step_timing
        out: dict[str, Any] = {
            "source": self.source,
            "step_timing": None if t is None else {"base_s": t.base_s, "per_seq_s": t.per_seq_s,
                                                   "prefill_per_token_s": t.prefill_per_token_s,
                                                   "source": t.source},
            "policies": {name: r.to_json() for name, r in self.policies.items()},
            "trace": None if self.trace is None else self.trace.to_json(),
            "horizon_s": self.horizon_s,
        }
        if self.queue_wait_saved_s is not None:
            out["queue_wait_saved_s"] = dict(self.queue_wait_saved_s)
            out["slot_seconds_freed"] = self.slot_seconds_freed
            out["tokens_freed"] = self.tokens_freed
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ReplaySection:
        if doc.get("error") is not None:
            return cls(str(doc.get("source", "")), str(doc["error"]))
        t = doc.get("step_timing") or {}
        timing = StepTiming(float(t.get("base_s") or 0), float(t.get("per_seq_s") or 0),
                            float(t.get("prefill_per_token_s") or 0), str(t.get("source", ""))) if t else None
        return cls(
            source=str(doc.get("source", "")), step_timing=timing,
            policies={str(k): ReplayResult.from_json(v) for k, v in (doc.get("policies") or {}).items()},
            queue_wait_saved_s=dict(doc["queue_wait_saved_s"]) if doc.get("queue_wait_saved_s") else None,
            slot_seconds_freed=doc.get("slot_seconds_freed"), tokens_freed=doc.get("tokens_freed"),
            trace=Table.from_json(doc["trace"]) if doc.get("trace") else None, horizon_s=doc.get("horizon_s"),
        )


@dataclass(frozen=True, slots=True)
class CapacitySection:
    """The server's shape over the run and what early aborts saved, from the simulator's ledger."""

    max_num_seqs: int | None
    timeline: Table  # t_s, running, waiting
    queue_wait_samples_s: tuple[float, ...]
    ttft: Figure
    generated_tokens: Figure
    throughput: Figure
    replay: ReplaySection | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_num_seqs": self.max_num_seqs, "timeline": self.timeline.to_json(),
                     "queue_wait_samples_s": list(self.queue_wait_samples_s), "ttft": self.ttft.to_json(),
                     "generated_tokens": self.generated_tokens.to_json(),
                     "throughput": self.throughput.to_json()}
        if self.replay is not None:
            out["replay"] = self.replay.to_json()
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CapacitySection:
        return cls(
            max_num_seqs=doc.get("max_num_seqs"), timeline=Table.from_json(doc.get("timeline")),
            queue_wait_samples_s=tuple(doc.get("queue_wait_samples_s") or ()),
            ttft=Figure.from_json(doc.get("ttft"), "s"),
            generated_tokens=Figure.from_json(doc.get("generated_tokens")),
            throughput=Figure.from_json(doc.get("throughput")),
            replay=ReplaySection.from_json(doc["replay"]) if isinstance(doc.get("replay"), Mapping) else None,
        )


def ledger_timeline(entries: Iterable[LedgerEntry], t0: float) -> list[list[float]]:
    """[[t_s, running, waiting], …] at every change, t_s seconds after `t0`, from the ledger's marks."""
    return [[round(t - t0, 6), running, waiting] for t, running, waiting in ledger_occupancy(entries)]


def _replay_section(cf: Counterfactuals) -> ReplaySection:
    results = cf.results
    perfect, full = results.get("perfect"), results.get("full")
    # What the replay ran on, so `stopstorm replay REPORT` can ask "what if" later.
    section = ReplaySection(source=_REPLAY_SOURCE, step_timing=cf.timing, policies=dict(results),
                            trace=Table(TRACE_COLUMNS, trace_to_rows(cf.trace)), horizon_s=cf.horizon)
    if perfect is None or full is None or not perfect.queue_wait or not full.queue_wait:
        return section
    saved = {q: getattr(full.queue_wait, q) - getattr(perfect.queue_wait, q) for q in ("p50", "p95", "p99", "mean")}
    return replace(section, queue_wait_saved_s=saved, slot_seconds_freed=full.slot_seconds - perfect.slot_seconds,
                   tokens_freed=full.generated_tokens - perfect.generated_tokens)


def capacity_section(ledger: LedgerSnapshot | None, records: Iterable[StreamRecord], run_start: float,
                     duration_s: float, max_num_seqs: int | None) -> CapacitySection | None:
    """The `capacity` section of the report, or None without a ledger."""
    if ledger is None:
        return None
    entries = ledger.served
    qw = tuple(sorted(q for e in entries if (q := e.queue_wait) is not None))
    ttft = distribution(e.first_token - e.arrival for e in entries if e.first_token is not None)
    generated = sum(e.generated_tokens for e in entries)
    replay: ReplaySection | None = None
    if max_num_seqs and entries:
        try:
            cf = replay_counterfactuals(ledger, max_num_seqs, list(records), run_end=run_start + duration_s)
        except ValueError as exc:
            replay = ReplaySection(_REPLAY_SOURCE, str(exc))
        else:
            replay = _replay_section(cf)
    return CapacitySection(
        max_num_seqs=max_num_seqs,
        timeline=Table(("t_s", "running", "waiting"), ledger_timeline(entries, run_start), LEDGER_SOURCE),
        queue_wait_samples_s=qw,
        ttft=(Figure(ttft, "s", LEDGER_SOURCE, "server side: arrival → first token") if ttft is not None
              else unknown("s", "server side: arrival → first token")),
        generated_tokens=Figure(generated, "tokens", LEDGER_SOURCE),
        throughput=(Figure(generated / duration_s, "tokens/s", LEDGER_SOURCE) if duration_s > 0
                    else unknown("tokens/s")),
        replay=replay,
    )
