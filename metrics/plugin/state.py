"""One process's stopstorm run, as one typed object: what the plugin's listeners share between Locust events.

Locust's listeners are module functions, so the state they pass on has to live somewhere; it lives here, named
and typed, instead of in string-keyed dicts spread over modules. `RUN` is the process's one instance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from stopstorm.metrics.analysis.verdict import CapacitySearch
from stopstorm.metrics.plugin.record_sink import RecordSink
from stopstorm.metrics.record import StreamRecord
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
    """Everything this process's listeners hand each other during one Locust run."""

    environment: Any = None  # the Locust Environment, from init
    collects: bool = False  # the master or a single process: keeps records, reads truth, writes the report
    simulator: EmbeddedSimulator | None = None  # the one this process started (no --host)
    started: float | None = None  # test_start, monotonic
    started_wall: float | None = None  # test_start, time.time()
    stopped: float | None = None  # test_stop, monotonic
    records: list[StreamRecord] = field(default_factory=list)  # every finished stream's (the master's: all)
    sink: RecordSink | None = None  # --stopstorm-records
    scraper: MetricsScraper | None = None  # {host}/metrics in the background
    log: LineFollower | None = None  # --server-log (a file, or `-`: stdin) or --server-log-cmd
    server_log_cmd: str = ""  # --server-log-cmd as given at init (the web UI's form may not change it)
    arrivals: ArrivalStats | None = None  # --arrival-rate's clock, once a user made it
    reported: bool = False  # the report was written (Locust's shutdown can run twice after SIGTERM)
    report: Report | None = None  # the run's Report, once built
    capacity_search: CapacitySearch | None = None  # capacity.py's steps so far (it announces them here)


RUN = RunState()
