"""The stop-semantics probe's results: collected as the probe user (stopstorm/users/probe.py) walks its matrix,
printed after Locust's own summary with the verdict in words, and written to the probe's own files when Locust
quits: its JSON (`--probe-json`, the table's cells and every stream) and its run report (`--probe-report`, the
Report pipeline's JSON and HTML, with the GPU section and files when a GPU was sampled).

The probe's report is the run's report: the main run's stopstorm-report.json is not written by a probe run (it
would hold an empty accounting). Its records are the matrix's streams (an early-stop row's close at the first
token would blur its close cell's Stop → GPU idle, the figure `--probe-gap` exists for); the early-stop rows
are in the probe's table and JSON.

The probe user hands each judged stream here (`PROBE.add`), so the Locust wiring stays in this package and the
users never need to be imported by it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import locust
import orjson
from locust import events

from stopstorm.metrics import redact
from stopstorm.metrics.analysis.probe import PROBE_SCHEMA_VERSION, ProbeCell, ProbeSample, summarise
from stopstorm.metrics.figures import LEDGER_SOURCE
from stopstorm.metrics.plugin import gpu, self_monitor
from stopstorm.metrics.plugin.signals import stop_reason
from stopstorm.metrics.plugin.state import RUN
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.report.build import RunInputs, build_report
from stopstorm.metrics.report.console import format_gpu
from stopstorm.metrics.report.gpu_files import gpu_file_names, write_gpu_files
from stopstorm.metrics.report.html_page import write_html_report
from stopstorm.metrics.report.json_file import write_report
from stopstorm.metrics.report.model import Report, RunMeta
from stopstorm.metrics.report.probe_table import format_table, probe_verdict
from stopstorm.metrics.truth.ledger import LedgerClient, LedgerSnapshot
from stopstorm.metrics.truth.vllm_log import LineFollower

__all__ = ["DEFAULT_PROBE_REPORT", "PROBE", "ProbeResults"]

_log = logging.getLogger("stopstorm.probe")
_LIBRARIES = ("requests", "httpx", "openai", "geventhttpclient", "locust", "gevent")
DEFAULT_PROBE_REPORT = "stopstorm-probe-report.json"
_META_OPTIONS = ("probe_stacks", "probe_modes", "probe_repeats", "probe_stop_tokens", "probe_early",
                 "probe_early_repeats", "probe_gap", "max_tokens", "ignore_eos", "hold_seconds", "sim_args")


@dataclass
class ProbeResults:
    """Every probed stream with the server's truth about it, and which truth judged them."""

    streams: list[tuple[StreamRecord, dict[str, Any] | None]] = field(default_factory=list)
    truth_source: str = LEDGER_SOURCE  # the simulator ledger, or vLLM's log + /metrics
    active: bool = False  # a probe is walking its matrix in this process: its files are the run's
    early: set[int] = field(default_factory=set)  # id() of the early-stop rows' records (not in the report)
    log: LineFollower | None = None  # vLLM's log as the probe followed it (its index outlives the follower)
    started: float | None = None  # monotonic, the first stream's send

    def add(self, record: StreamRecord, truth: dict[str, Any] | None, early: bool = False) -> None:
        if self.started is None:
            self.started = record.sent
        self.streams.append((record, truth))
        if early:
            self.early.add(id(record))

    def cells(self) -> list[ProbeCell]:
        return summarise(ProbeSample.from_pair(record, entry) for record, entry in self.streams)

    def matrix_records(self) -> list[StreamRecord]:
        """The matrix's streams (the report's): every probed record but the early-stop rows'."""
        return [r for r, _ in self.streams if id(r) not in self.early]

    def write(self, path: str, host: str) -> str:
        """Write the JSON; returns the table and the verdict."""
        cells = self.cells()
        verdict = probe_verdict(cells)
        doc = {
            "schema_version": PROBE_SCHEMA_VERSION,
            "host": host,
            "truth_source": self.truth_source,
            "versions": _library_versions(),
            "cells": [dataclasses.asdict(c) for c in cells],
            "verdict": verdict,
            "streams": [{"record": r.to_json(), "ledger": e, "early": id(r) in self.early} for r, e in self.streams],
        }
        with open(path, "wb") as f:
            f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        return format_table(cells) + "\n\nverdict:\n" + "\n".join(f"- {line}" for line in verdict)


PROBE = ProbeResults()


def _library_versions() -> dict[str, str]:
    out = {}
    for dist in _LIBRARIES:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _ledger(host: str) -> LedgerSnapshot | None:
    """The simulator's ledger once settled (None for real vLLM, or when it cannot be read)."""
    if not host:
        return None
    client = LedgerClient(host)
    try:
        return client.wait_settled(1.0) if client.available() else None
    finally:
        client.close()


def probe_report(env: Any) -> Report:
    """The probe's run report, by the Report pipeline, from its matrix streams and the truths read for them."""
    opts = env.parsed_options
    host = env.host or ""
    records = PROBE.matrix_records()
    ledger = _ledger(host)
    scraper, RUN.scraper = RUN.scraper, None  # the plugin's: stopped at test_stop; the probe's report ends it
    delta = None
    if scraper is not None:
        delta = scraper.delta()
        scraper.close()
    started = RUN.started or PROBE.started or time.monotonic()
    ended = RUN.stopped or time.monotonic()
    readings, idle_pct, gpu_off = gpu.readings()
    path = getattr(opts, "probe_report", "") or DEFAULT_PROBE_REPORT
    reason = stop_reason()  # SIGTERM or Ctrl-C cut the probe: its report covers it until then
    meta = RunMeta(host=redact.redact_url(host), locust_version=locust.__version__, started_at=RUN.started_wall,
                   partial=reason is not None, partial_reason=reason,
                   duration_s=ended - started,
                   ledger_schema_version=ledger.schema_version if ledger is not None else None,
                   options={k: getattr(opts, k) for k in _META_OPTIONS if hasattr(opts, k)}, gpu_off=gpu_off,
                   scenario="stop-semantics probe")
    return build_report(RunInputs(
        records=records, meta=meta, started=started, ended=ended, ledger=ledger, metrics=delta,
        log=PROBE.log if PROBE.log is not None else RUN.log, self_monitor=self_monitor.summaries(), gpu=readings,
        gpu_idle_pct=idle_pct, gpu_files=gpu_file_names(path), counterfactuals=False))


@events.quit.add_listener
def _write_probe_files(**_kwargs: Any) -> None:
    """The probe's table and verdict, its JSON, and its own run report; then the run's report is done (hooks
    writes no stopstorm-report.json for a probe run). Runs before hooks' report listener (registered first)."""
    env = RUN.environment
    if not PROBE.active or env is None or RUN.reported:
        return
    RUN.reported = True  # the probe's report is the run's (metrics/plugin/hooks.py writes nothing more)
    opts = env.parsed_options
    try:
        path = opts.probe_json
        text = PROBE.write(path, env.host or "")
        report_path = getattr(opts, "probe_report", "") or DEFAULT_PROBE_REPORT
        report = probe_report(env)
        RUN.report = report
        write_report(report_path, report)
        if report.gpu is not None:
            write_gpu_files(report.gpu)
        html = write_html_report(report_path, report, taken=getattr(opts, "html_file", None))
        gpu_lines = "\n" + "\n".join(format_gpu(report.gpu)) if report.gpu is not None else ""
        print(f"\nstopstorm stop-semantics probe (truth: {PROBE.truth_source}; JSON: {path}; report: {report_path}, "
              f"{html})\n{text}{gpu_lines}\n", flush=True)
    except Exception:
        _log.exception("stopstorm: the probe's files failed; Locust's own results stand")
