"""The Report: one typed result per run, built once (stopstorm/metrics/report/build.py), read by every view.

The console, the JSON file, the HTML page, the web UI's Stops tab and comparisons are writers over a `Report`;
none edits another's output, so a figure shown in two places is one value. `report_to_json` /
`report_from_json` are its JSON form (the file a run writes, and what `stopstorm compare` reads back), layout
below; reading a saved file is the one place a dict becomes a Report.

JSON layout (schema_version 3):

    {"schema_version": 3,
     "meta": {...},                      # the run's facts: host, options, library versions, times; blocks below
     "sources": ["client records", "simulator ledger", ...],   # the truths this run had
     "zombie_grace_s": 0.1,
     "cells": [{"stack": "requests", "close_mode": "close", "figures": {NAME: FIGURE, ...}}, ...],
     "overall": {"figures": {NAME: FIGURE, ...}},
     "run": {"figures": {NAME: FIGURE, ...}},
     "stops": [STOP, ...],               # the latest stopped streams, newest first (the web UI's Stops tab)
     "self_monitor": {...},              # always (from Locust runs); sections below
     "gpu": {...},                       # when a GPU source was read
     "capacity": {...},                  # when the simulator's ledger was read
     "summary": {...},                   # the fixed summary block (metrics/analysis/verdict.py)
     "verdict": {...},                   # the verdict in sentences, and what it was decided on
     "over_time": TABLE,                 # the run in bins: zombies, generated and delivered tokens/s
     "capacity_search": {...},           # capacity.py's steps and knee, when it ran
     "thresholds": [THRESHOLD, ...]}     # with --fail-on

A cell is one client stack × close mode: "close_mode" is the mode a stopped stream used, or "not stopped" for
every stream nobody stopped (whatever mode it would have used; version 2 filed those under their planned
mode, which for a stream planned never to stop was "none").

Every FIGURE is {"value", "unit", "source"} plus an optional "note". "value" is a number, a string (a finding), an
object of counts by error text (`failures`), an object {"count", "p50", "p90", "p95", "p99", "max", "mean"} for a
distribution, or null when its truth was unavailable (source "unavailable"); never 0 for unknown. Times are
seconds, slot time slot-seconds (`slot-s`). Cell and overall figures: streams, stopped, failed, failures,
interrupted (streams the run's end cut short: neither in failed nor in failures), aborted, abort_latency,
wasted_tokens, zombies, zombie_slot_seconds, queue_wait, freed_tokens, freed_slot_seconds, goodput_tokens,
goodput_rate, log_aborted, log_abort_latency, ttft (request written or sent → first token, client side), and
the closed stops' classes (metrics/analysis/closes.py):
closed_stops, never_reached, ran_on, ran_on_to_end, ran_on_tokens, ran_on_slot_seconds. Run figures: duration,
freed_tokens_rate, ledger_aborts, vllm_counted_aborts, blind_spot, log_aborts, unmatched_requests,
unjoined_streams, ran_on (a finding: the missed closes in words). A reader of an older report gets the newer
figures as unavailable.

STOP (metrics/analysis/accounting.py `StopRow`): {"stack", "close_mode", "request_id", "tokens_read",
"generated" (null without per-request truth), "wasted", "stop_to_freed_s", "state" (the server's finish
reason, "zombie (still running)", "aborting" or "unknown"), "truth", "zombie_slot_s" (slot time it held after
Stop as a zombie: 0 when it was none, null without per-request truth)}.

"meta" blocks: "partial": false, or true with "partial_reason" (SIGTERM or Ctrl-C cut the run: figures cover it
until then); "records": {"path", "written"} with --stopstorm-records; "metrics": the /metrics scraper's {"url",
"interval_s", "scrapes", "errors", "last_error", "window_s"}; "server_log": the server-log follower's {"source"
("file", "command", "stdin"), "path", "lines", "events", "before_run" (history dropped), "matched" (events naming
this run's requests), "errors", "last_error", "problems", and for --server-log-cmd "command", "pid", "exit",
"bytes", "overlong_lines", "stderr_lines", "stderr_tail"}; "open_model": {"arrival_rate", "arrivals", "late",
"late_s"} with --arrival-rate; "gpu": {"off": why} when no GPU source was read; "scenario": the label `stopstorm
scenarios` gave the run; "distributed", only from a Locust master (metrics/plugin/distributed.py): {"records": N
received from workers, "bad_records": N unreadable, "incomplete": [worker ids whose final batch never came, or
whose count fell short of what they said they sent: died, or never answered], "workers": {ID: {"records",
"batches", "claimed_sent", "final", "state", "clock_shift_s", "drained": records that came after the master asked
for the final batches}}}.

THRESHOLD (metrics/analysis/thresholds.py): {"expr" (as given, spaces dropped), "value" (the figure's, null when
it could not be checked), "held" (false: broken, the run's exit status 3), "note" (why unknown, which cells
broke)}.

"self_monitor" (metrics/plugin/self_monitor.py): the load generator's own health, {PROCESS: SUMMARY} keyed
"local", "master" or "worker <client id>". SUMMARY: {"pid", "interval_ms", "max_loop_lag_ms", "wall_s",
"cpu_s", "cpu_pct" (of one core), "bridge_cpu_s" (the asyncio bridge thread's, null without one), "hub_lag"
and "bridge_lag" ({"count", "p50_ms", "p99_ms", "max_ms", "mean_ms", "lagged" (stalls over the bound),
"lagged_s"}, null when not sampled), "ttft" and "itl": {"checked", "flagged", "late_p99_ms", "late_max_ms"},
"gc": {"collections" (by generation), "pause_total_s", "pause_max_ms"}}. A stamp (a first token, a chunk) is
flagged when the loop that took it was late at that moment by more than max_loop_lag_ms; late_p99_ms and
late_max_ms are the checked stamps' measured lateness bounds (max_loop_lag_ms for a stamp taken on time): the
error bar of the TTFT and ITL figures. An ITL gap is flagged when either of its stamps is.

"gpu" (metrics/analysis/gpu_attribution.py): {"source": "nvml"|"dcgm", "devices": [{"index", "name",
"uuid"}], "interval_s", "idle_pct", "errors", "last_error", "timeline": {"columns": ["t_s", "gpu",
"util_pct", "power_w", "energy_j", "mem_used_bytes", "sm_clock_mhz"], "rows": [[...], ...]}, "util_samples":
{"columns": ["t_s", "gpu", "util_pct"], "rows"} (the driver's own higher-rate samples), "stop_marks_s":
[...], "stops": {"columns": ["t_s", "stack", "close_mode", "request_id", "stop_to_idle_s"], "rows"}, "files":
{"timeline_csv", "stops_csv", "plot_png"}, and the FIGUREs gpu_busy_seconds (GPU-s), energy (J), mean_power
(W), energy_per_delivered_token (J/token), wasted_gpu_seconds (GPU-s), wasted_energy (J), idle_stops (stops),
stop_to_idle (distribution, s); and "cells": [{"stack", "close_mode", "wasted_gpu_seconds", "wasted_energy",
"idle_stops", "stop_to_idle"}] (each a FIGURE), one per stack × close mode of the report's "cells". t_s is
seconds since the run's start (the opening reading may be a few ms before 0); energy_j counts from each GPU's
first reading; a reading the GPU does not give is null.

"capacity" (metrics/analysis/capacity.py): {"max_num_seqs", "timeline": {"columns": ["t_s", "running",
"waiting"], "rows": [...], "source"} (t_s since the run's start), "queue_wait_samples_s": [sorted seconds],
"ttft", "generated_tokens", "throughput" (FIGUREs, TTFT server side: arrival → first token), "replay":
{"source", "step_timing": {"base_s", "per_seq_s", "prefill_per_token_s", "source"}, "policies":
{"recorded"|"perfect"|"full": {"policy", "requests", "makespan_s", "generated_tokens", "delivered_tokens",
"wasted_tokens", "slot_seconds", "throughput_tok_s", "goodput_tok_s", "queue_wait", "ttft"}},
"queue_wait_saved_s": {"p50", "p95", "p99", "mean"}, "slot_seconds_freed", "tokens_freed", "trace":
{"columns": ["t_s", "prompt_tokens", "target_tokens", "stop_tokens", "aborted_at_tokens"], "rows": [...]},
"horizon_s"} (or {"source", "error"} when the replay could not run)}.

"summary" (metrics/analysis/verdict.py `Summary`): {"figures": {"requests", "completed" (read to their end,
nobody pressed Stop), "request_rate" (requests/s), "output_rate" (generated tokens/s: the ledger, else vLLM's
counters), "goodput_rate", "ttft", "tpot", "itl" (the clients' timings: distributions, s), "queue_wait",
"step" (the server's decode step: the median of its requests' mean inter-token time)}: FIGUREs, "stacks" (the
client stacks that sent streams), "planned_stacks" (those the run's user classes name), "ttft_samples_s"
[sorted seconds]}. "verdict" (`Verdict`): {"sentences": [...], "caveats": [...], "step_bound_s" (what "within
one engine step" allowed), "zombie_share" (zombie slot-s over duration × max_num_seqs), "cells": [{"stack",
"close_mode", "outcome" ("honoured", "late", "never", "unknown"), "stopped", "aborted", "zombies", "p99_s"}]}.
"over_time" (metrics/analysis/over_time.py): {"columns": ["t_s", "zombies", "generated_tok_s",
"delivered_tok_s"], "rows", "source"}, bins from the run's start (zombies: the most held at once in the bin;
null without a ledger). "capacity_search" (`CapacitySearch`): {"slo", "quantile", "knee_users", "estimate",
"min_requests", "steps": [{"users", "requests", "value_s", "held", "interval_s" ([lo, hi], the quantile's 95 %
bootstrap interval), "request_rate", "output_rate", "rate_source", "end_s"}]}.

Versions: 1, the accounting (cells, overall, run) and meta; 2 adds "self_monitor", "gpu", "capacity", "stops"
and the meta blocks "partial", "records", "open_model", "gpu" and "distributed"; later, within version 2 and
additive, the figure ttft and "thresholds". 3 files a stream nobody
stopped once, in its stack's "not stopped" cell (so a cell's figures mean what that close mode did to stopped
streams), and adds "summary", "verdict", "over_time", "capacity_search" and each STOP's "zombie_slot_s". Every
other field keeps its meaning; a version-2 reader that sums cells per close mode must read "not stopped" too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from stopstorm.metrics.analysis.accounting import Accounting, Cell, Figures, RunFigures, StopRow
from stopstorm.metrics.analysis.capacity import CapacitySection
from stopstorm.metrics.analysis.gpu_attribution import GpuSection
from stopstorm.metrics.analysis.thresholds import ThresholdResult
from stopstorm.metrics.analysis.verdict import CapacitySearch, Summary, Verdict
from stopstorm.metrics.figures import Figure, Table

__all__ = [
    "GPU_ON_WORKER",
    "REPORT_SCHEMA_VERSION",
    "DistributedInfo",
    "LagStats",
    "LogInfo",
    "MonitorSummary",
    "OpenModelInfo",
    "RecordsInfo",
    "Report",
    "RunMeta",
    "ScrapeInfo",
    "WorkerInfo",
    "report_from_json",
    "report_to_json",
]

REPORT_SCHEMA_VERSION = 3
# meta.gpu_off when a distributed run's GPU is sampled by the worker on the GPU host, not by this process
GPU_ON_WORKER = "sampled by the worker on the GPU host (--gpu-host-worker)"

Json = dict[str, Any]


def _figures_json(items: Sequence[tuple[str, Figure]]) -> Json:
    return {name: f.to_json() for name, f in items}


def _figures_from_json(cls: type[Any], doc: Any) -> Any:
    figs = doc if isinstance(doc, Mapping) else {}
    return cls(**{f.name: Figure.from_json(figs.get(f.name)) for f in fields(cls)})


# --- meta ------------------------------------------------------------------------------------------------------


def _plain(cls: type[Any], doc: Any) -> Any:
    """A flat dataclass from its JSON object (missing keys: the field's default, else None)."""
    d = doc if isinstance(doc, Mapping) else {}
    return cls(**{f.name: d.get(f.name) for f in fields(cls) if f.name in d or f.init})


def _plain_json(obj: Any) -> Json:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


@dataclass(frozen=True, slots=True)
class ScrapeInfo:
    """The /metrics scraper's run."""

    url: str | None = None
    interval_s: float | None = None
    scrapes: int | None = None
    errors: int | None = None
    last_error: str | None = None
    window_s: float | None = None


@dataclass(frozen=True, slots=True)
class LogInfo:
    """The server-log follower's run (a file, a command's output or standard input)."""

    source: str | None = None  # "file", "command" or "stdin"
    path: str | None = None
    lines: int | None = None
    events: int | None = None
    before_run: int | None = None  # events stamped before the run (history a command replayed), dropped
    matched: int | None = None  # events that name one of this run's requests
    errors: int | None = None
    last_error: str | None = None
    problems: tuple[str, ...] = ()  # what the follower found missing, in words
    command: str | None = None  # --server-log-cmd
    pid: int | None = None
    exit: Mapping[str, Any] | None = None  # {"code", "after_s", "during_run"} once the command exited
    bytes: int | None = None
    overlong_lines: int | None = None
    stderr_lines: int | None = None
    stderr_tail: tuple[str, ...] = ()

    def to_json(self) -> Json:
        out = _plain_json(self)
        out["problems"], out["stderr_tail"] = list(self.problems), list(self.stderr_tail)
        return out

    @classmethod
    def from_json(cls, doc: Any) -> LogInfo:
        d = dict(doc) if isinstance(doc, Mapping) else {}
        d["problems"], d["stderr_tail"] = tuple(d.get("problems") or ()), tuple(d.get("stderr_tail") or ())
        return _plain(cls, d)


@dataclass(frozen=True, slots=True)
class OpenModelInfo:
    """--arrival-rate: were the arrivals on time, or did too few users make them late?"""

    arrival_rate: float | None = None
    arrivals: int | None = None
    late: int | None = None
    late_s: float | None = None


@dataclass(frozen=True, slots=True)
class RecordsInfo:
    path: str | None = None
    written: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    records: int | None = None
    batches: int | None = None
    claimed_sent: int | None = None
    final: bool | None = None
    state: str | None = None
    clock_shift_s: float | None = None
    drained: int | None = None


@dataclass(frozen=True, slots=True)
class DistributedInfo:
    """What each worker sent the master (metrics/plugin/distributed.py)."""

    records: int = 0
    bad_records: int = 0
    incomplete: tuple[str, ...] = ()
    workers: Mapping[str, WorkerInfo] = field(default_factory=dict)

    def to_json(self) -> Json:
        return {"records": self.records, "bad_records": self.bad_records, "incomplete": list(self.incomplete),
                "workers": {k: _plain_json(w) for k, w in self.workers.items()}}

    @classmethod
    def from_json(cls, doc: Any) -> DistributedInfo:
        d = doc if isinstance(doc, Mapping) else {}
        return cls(int(d.get("records") or 0), int(d.get("bad_records") or 0), tuple(d.get("incomplete") or ()),
                   {str(k): _plain(WorkerInfo, v) for k, v in (d.get("workers") or {}).items()})


@dataclass(frozen=True, slots=True)
class RunMeta:
    """The run's facts: where it ran, with what, for how long, and whether it was cut short."""

    host: str = ""
    locust_version: str | None = None
    started_at: float | None = None  # time.time() at test start
    duration_s: float | None = None
    ledger_schema_version: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # the run's stopstorm options (never the API key)
    partial: bool = False
    partial_reason: str | None = None
    metrics: ScrapeInfo | None = None
    server_log: LogInfo | None = None
    open_model: OpenModelInfo | None = None
    records: RecordsInfo | None = None
    distributed: DistributedInfo | None = None
    gpu_off: str | None = None  # why there are no GPU figures (JSON: meta.gpu.off)
    scenario: str | None = None  # the label `stopstorm scenarios` gave this run

    def to_json(self) -> Json:
        out: Json = {"host": self.host, "locust_version": self.locust_version, "started_at": self.started_at,
                     "duration_s": self.duration_s, "ledger_schema_version": self.ledger_schema_version,
                     "options": dict(self.options), "partial": self.partial}
        if self.partial_reason is not None:
            out["partial_reason"] = self.partial_reason
        for name in ("metrics", "open_model", "records"):
            block = getattr(self, name)
            if block is not None:
                out[name] = _plain_json(block)
        if self.server_log is not None:
            out["server_log"] = self.server_log.to_json()
        if self.distributed is not None:
            out["distributed"] = self.distributed.to_json()
        if self.gpu_off is not None:
            out["gpu"] = {"off": self.gpu_off}
        if self.scenario is not None:
            out["scenario"] = self.scenario
        return out

    @classmethod
    def from_json(cls, doc: Any) -> RunMeta:
        d = doc if isinstance(doc, Mapping) else {}
        return cls(
            host=str(d.get("host") or ""), locust_version=d.get("locust_version"), started_at=d.get("started_at"),
            duration_s=d.get("duration_s"), ledger_schema_version=d.get("ledger_schema_version"),
            options=dict(d.get("options") or {}), partial=bool(d.get("partial", False)),
            partial_reason=d.get("partial_reason"),
            metrics=_plain(ScrapeInfo, d["metrics"]) if isinstance(d.get("metrics"), Mapping) else None,
            server_log=LogInfo.from_json(d["server_log"]) if isinstance(d.get("server_log"), Mapping) else None,
            open_model=_plain(OpenModelInfo, d["open_model"]) if isinstance(d.get("open_model"), Mapping) else None,
            records=_plain(RecordsInfo, d["records"]) if isinstance(d.get("records"), Mapping) else None,
            distributed=(DistributedInfo.from_json(d["distributed"]) if isinstance(d.get("distributed"), Mapping)
                         else None),
            gpu_off=(d.get("gpu") or {}).get("off") if isinstance(d.get("gpu"), Mapping) else None,
            scenario=d.get("scenario"),
        )


# --- the self-monitor ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LagStats:
    """One event loop's lag over the run, in ms."""

    count: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    lagged: int = 0  # stalls over the bound
    lagged_s: float = 0.0


@dataclass(frozen=True, slots=True)
class MonitorSummary:
    """One process's own health during the run (metrics/plugin/self_monitor.py), as it travels."""

    pid: int | None = None
    interval_ms: float | None = None
    max_loop_lag_ms: float = 0.0
    wall_s: float | None = None
    cpu_s: float | None = None
    cpu_pct: float | None = None
    bridge_cpu_s: float | None = None
    hub_lag: LagStats | None = None
    bridge_lag: LagStats | None = None
    ttft_checked: int = 0
    ttft_flagged: int = 0  # stamped while its loop was late by more than max_loop_lag_ms
    ttft_late_p99_ms: float | None = None  # the stamps' measured lateness bound: the TTFT figures' error bar
    ttft_late_max_ms: float | None = None
    itl_checked: int = 0
    itl_flagged: int = 0
    itl_late_p99_ms: float | None = None
    itl_late_max_ms: float | None = None
    ttft_kernel: int = 0  # of the checked, stamped by the kernel at arrival (users/socket_stamps.py)
    itl_kernel: int = 0
    gc_collections: tuple[int, ...] = ()
    gc_pause_total_s: float = 0.0
    gc_pause_max_ms: float = 0.0

    def to_json(self) -> Json:
        return {"pid": self.pid, "interval_ms": self.interval_ms, "max_loop_lag_ms": self.max_loop_lag_ms,
                "wall_s": self.wall_s, "cpu_s": self.cpu_s, "cpu_pct": self.cpu_pct,
                "bridge_cpu_s": self.bridge_cpu_s,
                "hub_lag": None if self.hub_lag is None else _plain_json(self.hub_lag),
                "bridge_lag": None if self.bridge_lag is None else _plain_json(self.bridge_lag),
                "ttft": {"checked": self.ttft_checked, "flagged": self.ttft_flagged, "kernel": self.ttft_kernel,
                         "late_p99_ms": self.ttft_late_p99_ms, "late_max_ms": self.ttft_late_max_ms},
                "itl": {"checked": self.itl_checked, "flagged": self.itl_flagged, "kernel": self.itl_kernel,
                        "late_p99_ms": self.itl_late_p99_ms, "late_max_ms": self.itl_late_max_ms},
                "gc": {"collections": list(self.gc_collections), "pause_total_s": self.gc_pause_total_s,
                       "pause_max_ms": self.gc_pause_max_ms}}

    @classmethod
    def from_json(cls, doc: Any) -> MonitorSummary:
        d = doc if isinstance(doc, Mapping) else {}
        ttft, itl, gc = d.get("ttft") or {}, d.get("itl") or {}, d.get("gc") or {}
        return cls(
            pid=d.get("pid"), interval_ms=d.get("interval_ms"), max_loop_lag_ms=float(d.get("max_loop_lag_ms") or 0),
            wall_s=d.get("wall_s"), cpu_s=d.get("cpu_s"), cpu_pct=d.get("cpu_pct"), bridge_cpu_s=d.get("bridge_cpu_s"),
            hub_lag=_plain(LagStats, d["hub_lag"]) if isinstance(d.get("hub_lag"), Mapping) else None,
            bridge_lag=_plain(LagStats, d["bridge_lag"]) if isinstance(d.get("bridge_lag"), Mapping) else None,
            ttft_checked=int(ttft.get("checked") or 0), ttft_flagged=int(ttft.get("flagged") or 0),
            ttft_late_p99_ms=ttft.get("late_p99_ms"), ttft_late_max_ms=ttft.get("late_max_ms"),
            itl_checked=int(itl.get("checked") or 0), itl_flagged=int(itl.get("flagged") or 0),
            itl_late_p99_ms=itl.get("late_p99_ms"), itl_late_max_ms=itl.get("late_max_ms"),
            ttft_kernel=int(ttft.get("kernel") or 0), itl_kernel=int(itl.get("kernel") or 0),
            gc_collections=tuple(gc.get("collections") or ()), gc_pause_total_s=float(gc.get("pause_total_s") or 0),
            gc_pause_max_ms=float(gc.get("pause_max_ms") or 0),
        )


# --- the Report ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    """One run, as every view shows it."""

    meta: RunMeta
    accounting: Accounting
    stops: tuple[StopRow, ...] = ()  # the latest stopped streams, newest first
    self_monitor: Mapping[str, MonitorSummary] = field(default_factory=dict)
    gpu: GpuSection | None = None
    capacity: CapacitySection | None = None
    schema_version: int = REPORT_SCHEMA_VERSION
    summary: Summary | None = None  # the fixed block every view shows first, under the verdict
    verdict: Verdict | None = None
    over_time: Table | None = None  # t_s, zombies, generated_tok_s, delivered_tok_s (analysis/over_time.py)
    capacity_search: CapacitySearch | None = None  # capacity.py's steps and knee, when it ran
    thresholds: tuple[ThresholdResult, ...] = ()  # --fail-on, judged on this Report's figures

    @property
    def label(self) -> str:
        """How views name this run: its scenario, else its host."""
        return self.meta.scenario or self.meta.host or "run"


def _stop_json(s: StopRow) -> Json:
    return {"stack": s.stack, "close_mode": s.close_mode, "request_id": s.request_id, "tokens_read": s.tokens_read,
            "generated": s.generated, "wasted": s.wasted, "stop_to_freed_s": s.stop_to_freed_s, "state": s.state,
            "truth": s.truth, "zombie_slot_s": s.zombie_slot_s}


def report_to_json(report: Report) -> Json:
    """The report document (layout above)."""
    a = report.accounting
    out: Json = {
        "schema_version": report.schema_version,
        "meta": report.meta.to_json(),
        "sources": list(a.sources),
        "zombie_grace_s": a.zombie_grace_s,
        "cells": [{"stack": c.stack, "close_mode": c.close_mode, "figures": _figures_json(c.figures.items())}
                  for c in a.cells],
        "overall": {"figures": _figures_json(a.overall.items())},
        "run": {"figures": _figures_json(a.run.items())},
        "stops": [_stop_json(s) for s in report.stops],
        "self_monitor": {k: s.to_json() for k, s in report.self_monitor.items()},
    }
    if report.gpu is not None:
        out["gpu"] = report.gpu.to_json()
    if report.capacity is not None:
        out["capacity"] = report.capacity.to_json()
    if report.summary is not None:
        out["summary"] = report.summary.to_json()
    if report.verdict is not None:
        out["verdict"] = report.verdict.to_json()
    if report.over_time is not None:
        out["over_time"] = report.over_time.to_json()
    if report.capacity_search is not None:
        out["capacity_search"] = report.capacity_search.to_json()
    if report.thresholds:
        out["thresholds"] = [t.to_json() for t in report.thresholds]
    return out


def report_from_json(doc: Mapping[str, Any]) -> Report:
    """A saved report read back (version 1, 2 or 3); ValueError when `doc` is not a stopstorm report."""
    if not isinstance(doc, Mapping) or "overall" not in doc:
        raise ValueError("not a stopstorm report (no 'overall' section)")
    accounting = Accounting(
        cells=tuple(Cell(str(c.get("stack")), str(c.get("close_mode")),
                         _figures_from_json(Figures, (c.get("figures") or {})))
                    for c in doc.get("cells") or ()),
        overall=_figures_from_json(Figures, (doc.get("overall") or {}).get("figures")),
        run=_figures_from_json(RunFigures, (doc.get("run") or {}).get("figures")),
        sources=tuple(doc.get("sources") or ()),
        zombie_grace_s=float(doc.get("zombie_grace_s") or 0.0),
    )
    stops = tuple(StopRow(**{f.name: s.get(f.name) for f in fields(StopRow)})  # type: ignore[arg-type]
                  for s in doc.get("stops") or () if isinstance(s, Mapping))
    return Report(
        meta=RunMeta.from_json(doc.get("meta")),
        accounting=accounting,
        stops=stops,
        self_monitor={str(k): MonitorSummary.from_json(v) for k, v in (doc.get("self_monitor") or {}).items()},
        gpu=GpuSection.from_json(doc["gpu"]) if isinstance(doc.get("gpu"), Mapping) else None,
        capacity=CapacitySection.from_json(doc["capacity"]) if isinstance(doc.get("capacity"), Mapping) else None,
        schema_version=int(doc.get("schema_version") or 1),
        summary=Summary.from_json(doc["summary"]) if isinstance(doc.get("summary"), Mapping) else None,
        verdict=Verdict.from_json(doc["verdict"]) if isinstance(doc.get("verdict"), Mapping) else None,
        over_time=Table.from_json(doc["over_time"]) if isinstance(doc.get("over_time"), Mapping) else None,
        capacity_search=(CapacitySearch.from_json(doc["capacity_search"])
                         if isinstance(doc.get("capacity_search"), Mapping) else None),
        thresholds=tuple(ThresholdResult.from_json(t) for t in doc.get("thresholds") or () if isinstance(t, Mapping)),
    )
