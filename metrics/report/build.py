"""One pure function from a run's records and truth snapshots to its Report: the only place a Report is made.

The plugin gathers the inputs when a run ends (stopstorm/metrics/plugin/hooks.py), the web UI's Stops tab while
it runs; both call `build_report`, and every view renders what it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from stopstorm.metrics.analysis.accounting import LogLookup, account, by_outcome, stop_rows
from stopstorm.metrics.analysis.capacity import capacity_section
from stopstorm.metrics.analysis.gpu_attribution import IDLE_PCT, gpu_section
from stopstorm.metrics.analysis.over_time import over_time
from stopstorm.metrics.analysis.verdict import CapacitySearch, run_summary, verdict
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.report.model import MonitorSummary, Report, RunMeta
from stopstorm.metrics.truth.gpu import GpuReadings
from stopstorm.metrics.truth.ledger import LedgerSnapshot
from stopstorm.metrics.truth.vllm_metrics import MetricsDelta

__all__ = ["RunInputs", "build_report"]

_log = logging.getLogger("stopstorm")


@dataclass(frozen=True, slots=True)
class RunInputs:
    """Everything a Report is built from: the clients' records and the server truths read for the run."""

    records: Sequence[StreamRecord]
    meta: RunMeta
    started: float  # the run's window, time.monotonic()
    ended: float
    ledger: LedgerSnapshot | None = None  # the simulator's, read once the run's requests left the engine
    metrics: MetricsDelta | None = None  # vLLM's /metrics over the run
    log: LogLookup | None = None  # vLLM's request log
    max_num_seqs: int | None = None  # the server's, where it says (the simulator)
    self_monitor: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # summaries as they travel
    gpu: GpuReadings | None = None
    gpu_idle_pct: float = IDLE_PCT
    gpu_files: Mapping[str, str | None] = field(default_factory=dict)  # where the GPU writer puts its files
    counterfactuals: bool = True  # the replay (seconds of CPU on a long run); a live view leaves it out
    planned_stacks: Sequence[str] = ()  # the client stacks the run's user classes name (the summary says which ran)
    capacity_search: CapacitySearch | None = None  # capacity.py's steps, when it ran (plugin/state.py)


def build_report(inputs: RunInputs) -> Report:
    """The run's Report. Never raises for the GPU's sake: a failure there is said in `meta.gpu_off`."""
    duration = inputs.ended - inputs.started
    records = inputs.records
    # A stream nobody stopped is filed once, as "not stopped", not under a close mode it never used
    accounting = account(records, inputs.ledger, inputs.metrics, duration, log=inputs.log, cell_of=by_outcome)
    meta = inputs.meta
    gpu = None
    if inputs.gpu is not None:
        try:
            gpu = gpu_section(inputs.gpu, accounting, records, inputs.started, inputs.ended, inputs.gpu_files,
                              inputs.gpu_idle_pct)
        except Exception as exc:
            _log.exception("stopstorm: the GPU figures failed; the rest of the report stands")
            meta = replace(meta, gpu_off=f"the GPU figures failed ({type(exc).__name__}: {exc})")
    capacity = capacity_section(inputs.ledger, records, inputs.started, duration,
                                inputs.max_num_seqs if inputs.counterfactuals else None)
    monitors = {k: MonitorSummary.from_json(v) for k, v in inputs.self_monitor.items()}
    summary = run_summary(records, accounting, capacity, inputs.ledger, inputs.metrics, duration,
                          inputs.planned_stacks)
    flagged = {"ttft": (sum(m.ttft_flagged for m in monitors.values()), sum(m.ttft_checked for m in monitors.values())),
               "itl": (sum(m.itl_flagged for m in monitors.values()), sum(m.itl_checked for m in monitors.values()))}
    return Report(
        meta=meta,
        accounting=accounting,
        stops=stop_rows(records, inputs.ledger, zombie_grace_s=accounting.zombie_grace_s),
        self_monitor=monitors,
        gpu=gpu,
        capacity=capacity,
        summary=summary,
        verdict=verdict(accounting, summary, capacity, duration, flagged, meta.partial_reason,
                        inputs.capacity_search),
        over_time=over_time(records, inputs.ledger, inputs.started, inputs.ended, accounting.zombie_grace_s),
        capacity_search=inputs.capacity_search,
    )
