"""One process's stopstorm run, as one typed object: what the plugin's listeners share between Locust events.

Locust's listeners are module functions, so the state they pass on has to live somewhere; it lives here, named
and typed, instead of in string-keyed dicts spread over modules. `RUN` is the process's one instance.

A process may hold several runs (the web UI's Start, Stop, Start again): the fields under "this run" belong to
the run in progress and start from zero at each test_start (`begin_run`); the rest live as long as the process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stopstorm.metrics.analysis.verdict import CapacitySearch
from stopstorm.metrics.plugin.ledger_drain import LedgerDrain
from stopstorm.metrics.plugin.record_sink import RecordStore
from stopstorm.metrics.report.model import Report
from stopstorm.metrics.truth.vllm_log import LineFollower
from stopstorm.metrics.truth.vllm_metrics import MetricsScraper
from stopstorm.simulator.launcher import EmbeddedSimulator

__all__ = ["RUN", "ArrivalStats", "RunState"]


class ArrivalStats(Protocol):
    """What the report reads of an open-model arrival clock (stopstorm.users.shapes announces its clock)."""

    rate: float
    arrivals: int
    late: int
    late_s: float


@dataclass
class RunState:
    """Everything this process's listeners hand each other during its Locust runs."""

    # --- the process
    environment: Any = None  # the Locust Environment, from init
    collects: bool = False  # the master or a single process: keeps records, reads truth, writes the report
    simulator: EmbeddedSimulator | None = None  # the one this process started (no --host)
    server_log_cmd: str = ""  # --server-log-cmd as given at init (the web UI's form may not change it)
    arrivals: ArrivalStats | None = None  # --arrival-rate's clock, once a user made it
    runs: int = 0  # runs started in this process (the web UI may start several): the current one's number
    report: Report | None = None  # the latest run's Report, once built
    report_path: Path | None = None  # where the latest run's JSON went
    summary: str | None = None  # the latest run's console text, printed after Locust's at quit (headless)
    thresholds_broken: bool = False  # a --fail-on threshold broke in some run of this process
    written: list[tuple[int, Path, Path]] = field(default_factory=list)  # every run's (number, JSON, HTML)
    capacity_search: CapacitySearch | None = None  # capacity.py's steps so far (it announces them here)
    # Per truth URL, the last settled-entry number this process's drains read there (a forgetting simulator has
    # dropped 1..it: the next run reads after it)
    ledger_after: dict[str, int] = field(default_factory=dict)
    # --- this run (begin_run clears them)
    started: float | None = None  # test_start, monotonic
    started_wall: float | None = None  # test_start, time.time()
    stopping: float | None = None  # test_stopping (the run's end began: -t, Stop, a signal), monotonic
    stopped: float | None = None  # test_stop, monotonic
    # Every finished stream's (the master's: every worker's too), on disk until the report reads them back:
    # the --stopstorm-records file, else a spool in the temp folder (metrics/plugin/record_sink.py).
    records: RecordStore = field(default_factory=lambda: RecordStore(spool=False))
    ledger: LedgerDrain | None = None  # the simulator's settled entries as they come (metrics/plugin/ledger_drain.py)
    scraper: MetricsScraper | None = None  # {host}/metrics in the background
    log: LineFollower | None = None  # --server-log (a file, or `-`: stdin) or --server-log-cmd
    reporting: bool = False  # this run's report is being written (a second stop or a signal waits for it)
    reported: bool = False  # this run's report was written (Locust may fire test_stop twice for one run)

    def begin_run(self) -> int:
        """A new run starts from zero: its number (1, 2, … in this process)."""
        self.runs += 1
        self.started = self.started_wall = self.stopping = self.stopped = None
        self.records = RecordStore(spool=False)  # test_start gives it its file
        self.scraper = self.log = self.ledger = None
        self.reporting = self.reported = False
        return self.runs

    @property
    def in_progress(self) -> bool:
        """A run has started and its report is not written yet."""
        return self.started is not None and not self.reported


RUN = RunState()
