"""The run's lifecycle on Locust's events: importing this module registers every stopstorm listener, so a
locustfile needs one import (the shipped ones do it).

- init: every option checked (stopstorm/metrics/plugin/options.py) before anything starts; with no `--host`
  the embedded simulator is started (plugin/embedded.py); then the target is checked (it answers, serves the
  model). A bad value or an unusable target stops the run before any load, the option named, exit 2.
- Locust master/worker mode (plugin/distributed.py): workers ship their records to the master, whose
  collection is the one below; only the master (or the single process) scrapes, reads the ledger, reports.
- Every stream's record is kept (from the `request` event's context); `{host}/metrics` is scraped in the
  background every `--metrics-interval` seconds from test_start to test_stop (its first and latest good
  snapshots give the vLLM counters' delta; a host without /metrics only counts errors); with `--server-log PATH`
  vLLM's request log is followed from test_start to quit (per-request abort confirmation, each line stamped as
  it is read); at quit the simulator's ledger is fetched once (before the simulator stops), the run is
  accounted (metrics/analysis/accounting.py), its summary printed after Locust's and its JSON and HTML written.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import locust
from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner

from stopstorm.metrics.analysis.accounting import account, ledger_by_id
from stopstorm.metrics.analysis.capacity import capacity_section
from stopstorm.metrics.plugin import distributed, embedded, gpu, options, probe, redact, self_monitor
from stopstorm.metrics.plugin.record_sink import RecordSink
from stopstorm.metrics.plugin.signals import install_stop_signals, stop_reason
from stopstorm.metrics.plugin.state import RUN
from stopstorm.metrics.plugin.web_stops import install_stops_tab
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.report.console import format_summary
from stopstorm.metrics.report.document import to_json, write_report
from stopstorm.metrics.report.html_page import write_html_report
from stopstorm.metrics.truth.ledger import LedgerClient, server_max_num_seqs
from stopstorm.metrics.truth.vllm_log import LogFollower
from stopstorm.metrics.truth.vllm_metrics import MetricsScraper
from stopstorm.simulator.launcher import SimulatorStartError

__all__ = ["embedded_simulator"]

embedded_simulator = embedded.embedded_simulator
_log = logging.getLogger("stopstorm")
_ = (probe, gpu)  # imported for their listeners
# Options worth keeping in the report's meta (never the API key).
_META_OPTIONS = ("num_users", "spawn_rate", "run_time", "endpoint", "model", "max_tokens", "ignore_eos",
                 "stop_probability", "stop_at", "close_mix", "hold_seconds", "think_time", "sim_max_num_seqs",
                 "sim_args", "arrival_rate")


DEFAULT_REPORT = "stopstorm-report.json"

TABLE = options.OptionTable("stopstorm report", options=(
    options.Option("--stopstorm-report", "where to write the run's abort accounting as JSON; its summary is printed "
                   f"after Locust's (default {DEFAULT_REPORT})", DEFAULT_REPORT,
                   options.Parsed(lambda p: options.check_writable("--stopstorm-report", p or DEFAULT_REPORT),
                                  "a file path stopstorm can write (the HTML goes beside it)"),
                   env="STOPSTORM_REPORT", master_only=True),
    options.Option("--stopstorm-records", "also write every stream's record to this JSONL file as the stream ends "
                   "(flushed, so a killed run keeps them; truncated at start; default: not written)", "",
                   options.WritablePath(optional=True), env="STOPSTORM_RECORDS", master_only=True),
    options.Option("--server-log", "vLLM's log file (run it with --enable-log-requests), followed during the run to "
                   "confirm each stopped stream's abort; the embedded simulator's log (--sim-log) works too"),
    options.Option("--metrics-interval", "seconds between scrapes of {host}/metrics during the run (default 0.25)",
                   0.25, options.seconds(low=0.01), float),
))
options.register(TABLE, rank=40)


def _refuse(exc: Exception) -> None:
    """A bad option or target: one line, the simulator (if started) stopped, exit 2."""
    _log.error("stopstorm: %s", exc)
    embedded.stop_simulator()
    raise SystemExit(2) from None


@events.init.add_listener
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    """Options, then the embedded simulator, then the target: refused before any load."""
    RUN.environment = environment
    worker = isinstance(environment.runner, WorkerRunner)
    RUN.collects = not worker  # workers keep nothing: they ship their records to the master
    opts = environment.parsed_options
    redact.install_log_filter()
    if environment.host:
        redact.secrets_of_url(environment.host)
    if opts is not None:
        try:
            options.check_options(opts, worker=worker)  # every rule: nothing has started yet
        except ValueError as exc:
            _refuse(exc)
    if not environment.host and not worker:
        try:
            embedded.start_simulator(environment)
        except SimulatorStartError as exc:
            _refuse(exc)
    if environment.host and not worker:  # workers get theirs checked by the master first
        try:
            options.preflight(environment)
        except ValueError as exc:
            _refuse(exc)
    if RUN.collects:
        install_stop_signals()
        path = getattr(opts, "stopstorm_records", "") or ""
        if path:
            try:
                RUN.sink = RecordSink(path)
            except OSError as exc:  # checked writable at init; gone since (a race): still one line, exit 2
                _refuse(ValueError(f"--stopstorm-records {path}: cannot write there ({exc.strerror or exc})"))
    distributed.install(environment, lambda record: _collect_record(context={"record": record}))
    if getattr(environment, "web_ui", None) is not None:
        install_stops_tab(environment.web_ui, lambda: environment.host or "", lambda: RUN.records)


@events.request.add_listener
def _collect_record(context: dict[str, Any] | None = None, **_kwargs: Any) -> None:
    if RUN.collects and context and isinstance(context.get("record"), StreamRecord):
        record: StreamRecord = context["record"]
        RUN.records.append(record)
        sink = RUN.sink
        if sink is not None:
            try:
                sink.write(record)
            except OSError as exc:  # the run goes on; the report still gets every record
                _log.error("stopstorm: writing %s failed (%s); records go on to the report only", sink.path, exc)
                sink.close()
                RUN.sink = None
        record.compact()  # kept until the report: its per-chunk marks packed (benchmarks/bench_soak.py)


@events.test_start.add_listener
def _run_started(environment: Environment, **_kwargs: Any) -> None:
    if not RUN.collects or RUN.started is not None:
        return
    RUN.started, RUN.started_wall = time.monotonic(), time.time()
    opts = environment.parsed_options
    log_path = getattr(opts, "server_log", "") or ""
    if log_path:
        try:
            RUN.log = LogFollower(log_path).start()  # from the file's end now: this run's lines only
        except Exception as exc:
            _log.warning("stopstorm: following the server log %s failed: %s", log_path, exc)
    if environment.host:
        try:
            interval = float(getattr(opts, "metrics_interval", 0.25))  # checked at init: > 0, finite
            scraper = MetricsScraper(f"{environment.host.rstrip('/')}/metrics", interval=interval, timeout=2.0)
            if scraper.scrape_once() is None:  # a reading at the start, before the greenlet's first
                _log.info("stopstorm: no /metrics at %s yet (%s); scraping on, errors counted",
                          redact.redact_url(environment.host), scraper.last_error)
            scraper.start()
            RUN.scraper = scraper
        except Exception as exc:
            _log.warning("stopstorm: scraping /metrics failed: %s", exc)


@events.test_stop.add_listener
def _run_stopped(**_kwargs: Any) -> None:
    if RUN.stopped is None:
        RUN.stopped = time.monotonic()
    _stop_scraper()


def _stop_scraper() -> None:
    """Stop the background scrapes, with one last reading; the scraper is kept for the report."""
    scraper = RUN.scraper
    if scraper is not None and scraper.alive:
        scraper.stop()
        scraper.scrape_once()


def _stop_log() -> LogFollower | None:
    follower, RUN.log = RUN.log, None
    if follower is not None:
        follower.stop()  # reads what is new first
    return follower


def _fetch_ledger(host: str, settle_s: float = 1.0) -> dict[str, Any] | None:
    """The whole ledger, once every request has left the engine (users killed at the end are closing theirs),
    or as it is after `settle_s`; None when the server has no ledger (real vLLM)."""
    client = LedgerClient(host)
    try:
        if not client.available():
            return None
        deadline = time.monotonic() + settle_s
        while True:
            doc = client.ledger()
            if doc is None:
                raise RuntimeError(f"cannot read the simulator ledger at {host}/stopstorm/ledger")
            if all(e.get("freed") is not None for e in doc.get("requests", [])) or time.monotonic() > deadline:
                return doc
            time.sleep(0.02)
    finally:
        client.close()


@events.quit.add_listener
def _write_run_report(**_kwargs: Any) -> None:
    """After Locust's own stats (and the probe's table); before the simulator stops, so its ledger is there."""
    env = RUN.environment
    if env is None or not RUN.collects or RUN.started is None or RUN.reported:
        _stop_log()  # (after SIGTERM Locust's shutdown runs twice: the report is written once)
        return
    RUN.reported = True
    try:
        opts = env.parsed_options
        path = getattr(opts, "stopstorm_report", "") or DEFAULT_REPORT
        host = env.host or ""
        ledger_doc = _fetch_ledger(host) if host else None  # also lets the users' last aborts reach the log
        follower = _stop_log()
        _stop_scraper()
        scraper, RUN.scraper = RUN.scraper, None
        delta = None
        if scraper is not None:
            delta = scraper.delta()
            scraper.close()
        end = RUN.stopped if RUN.stopped is not None else time.monotonic()
        duration = end - RUN.started
        records = list(RUN.records)
        accounting = account(records, ledger_by_id(ledger_doc) if ledger_doc is not None else None, delta,
                             duration, run_end=ledger_doc.get("now") if ledger_doc is not None else None,
                             log=follower)
        meta: dict[str, Any] = {
            "host": redact.redact_url(host), "locust_version": locust.__version__, "started_at": RUN.started_wall,
            "duration_s": duration, "ledger_schema_version": (ledger_doc or {}).get("schema_version"),
            "options": {k: getattr(opts, k) for k in _META_OPTIONS if hasattr(opts, k)}}
        if scraper is not None:
            meta["metrics"] = {"url": redact.redact_url(scraper.url), "interval_s": scraper.interval,
                               "scrapes": scraper.scrapes, "errors": scraper.errors, "last_error": scraper.last_error,
                               "window_s": delta.duration if delta is not None else None}
        if (workers := distributed.workers_meta(env)) is not None:
            meta["distributed"] = workers
        if follower is not None:
            meta["server_log"] = {"path": follower.path, "lines": follower.lines, "events": follower.events,
                                  "errors": follower.errors, "last_error": follower.last_error}
        clock = RUN.arrivals
        if clock is not None:  # open model: were the arrivals on time, or did too few users make them late?
            meta["open_model"] = {"arrival_rate": clock.rate, "arrivals": clock.arrivals, "late": clock.late,
                                  "late_s": clock.late_s}
            if clock.late:
                _log.warning("stopstorm: %d of %d open-model arrivals went out late (no free user): raise -u",
                             clock.late, clock.arrivals)
        reason = stop_reason()
        meta["partial"] = reason is not None
        if reason is not None:
            meta["partial_reason"] = reason
        if RUN.sink is not None:
            meta["records"] = {"path": str(RUN.sink.path), "written": RUN.sink.written}
        doc = to_json(accounting, meta)
        doc["self_monitor"] = self_monitor.summaries()
        gpu_lines = gpu.extend_report(doc, accounting, records, RUN.started, end, path)
        capacity = capacity_section(ledger_doc, records, RUN.started, duration, server_max_num_seqs(host))
        if capacity is not None:
            doc["capacity"] = capacity
        doc = redact.redact_tree(doc)  # no key, no password, wherever a server's or a library's words put one
        write_report(path, doc)
        html_path = write_html_report(path, doc, taken=getattr(opts, "html_file", None))  # never over Locust's
        if reason is not None:
            print(f"\nstopstorm: PARTIAL report ({reason}): the figures cover the run until then", flush=True)
        summary = "\n".join([format_summary(accounting), *gpu_lines])
        print(f"\nstopstorm abort accounting (JSON: {path}; HTML: {html_path})\n{summary}\n", flush=True)
        for line in self_monitor.warnings_for(doc["self_monitor"]):
            print(f"stopstorm self-monitor: {line}", flush=True)
    except Exception:
        _log.exception("stopstorm: the abort accounting failed; Locust's own results stand")
    finally:
        _stop_log()
        sink, RUN.sink = RUN.sink, None
        if sink is not None:
            sink.close()


# Last: the run report above reads the simulator's ledger before this stops it.
events.quit.add_listener(embedded.stop_simulator)
