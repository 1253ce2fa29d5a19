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
  (`-`: standard input) or `--server-log-cmd CMD` (a command whose output is the log, run by the master in its
  own process group) vLLM's request log is followed from test_start to quit (per-request abort confirmation,
  each line stamped as it is read; events stamped before the run dropped); at quit the simulator's ledger is
  fetched once (before the simulator stops), the run is accounted (metrics/analysis/accounting.py), its
  summary printed after Locust's and its JSON and HTML written.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import locust
from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner

from stopstorm.metrics import redact
from stopstorm.metrics.analysis.accounting import server_id
from stopstorm.metrics.plugin import distributed, embedded, gpu, options, probe, self_monitor
from stopstorm.metrics.plugin.record_sink import RecordSink
from stopstorm.metrics.plugin.signals import install_stop_signals, stop_reason
from stopstorm.metrics.plugin.state import RUN
from stopstorm.metrics.plugin.truth_target import truth_host
from stopstorm.metrics.plugin.web_stops import LiveReport, install_stops_tab
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.report.build import RunInputs, build_report
from stopstorm.metrics.report.console import format_report
from stopstorm.metrics.report.gpu_files import gpu_file_names, write_gpu_files
from stopstorm.metrics.report.html_page import write_html_report
from stopstorm.metrics.report.json_file import write_report
from stopstorm.metrics.report.model import LogInfo, OpenModelInfo, RecordsInfo, Report, RunMeta, ScrapeInfo
from stopstorm.metrics.truth.ledger import LedgerClient, LedgerSnapshot, max_num_seqs_of
from stopstorm.metrics.truth.log_command import PipeLogFollower
from stopstorm.metrics.truth.vllm_log import LineFollower, LogFollower
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
                   "confirm each stopped stream's abort; `-` reads it from standard input; the embedded simulator's "
                   "log (--sim-log) works too"),
    options.Option("--server-log-cmd", "a command whose standard output is vLLM's log, instead of --server-log "
                   "(e.g. \"kubectl logs -f deploy/vllm --since=1s\", \"docker logs -f --since 1s vllm\", \"ssh "
                   "gpu-host tail -n 0 -F /var/log/vllm.log\"): run by the master through /bin/sh for the run, its "
                   "stderr kept apart; see docs/guides/server-log.md. Taken from the command line, environment or "
                   "config file only: not shown in the web UI's form, and a value sent from it is ignored (it would "
                   "be a shell command from the browser)", in_web_ui=False),
    options.Option("--metrics-interval", "seconds between scrapes of {host}/metrics (--truth-url's when given) during "
                   "the run (default 0.25)",
                   0.25, options.seconds(low=0.01), float),
))


def _check_server_log(opts: Any) -> None:
    path = getattr(opts, "server_log", "") or ""
    command = (getattr(opts, "server_log_cmd", "") or "").strip()
    if path and command:
        raise ValueError("--server-log and --server-log-cmd are both given: give one (the command's output is "
                         "the log)")
    if path == "-" and sys.stdin is not None and sys.stdin.isatty():
        raise ValueError("--server-log -: standard input is a terminal, not the server's log; pipe the log in "
                         "(kubectl logs -f deploy/vllm --since=1s | stopstorm ... --server-log -) or give "
                         "--server-log-cmd")


options.register(TABLE, _check_server_log, rank=40)


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
        RUN.server_log_cmd = (getattr(opts, "server_log_cmd", "") or "").strip()  # now: never the web UI's
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
        install_stops_tab(environment.web_ui, _tab_report)


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
    RUN.log = _start_log(opts)
    if environment.host:
        try:
            interval = float(getattr(opts, "metrics_interval", 0.25))  # checked at init: > 0, finite
            truth = truth_host(environment)  # --truth-url when --host is a proxy in front of the server
            scraper = MetricsScraper(f"{truth}/metrics", interval=interval, timeout=2.0)
            if scraper.scrape_once() is None:  # a reading at the start, before the greenlet's first
                _log.info("stopstorm: no /metrics at %s yet (%s); scraping on, errors counted",
                          redact.redact_url(truth), scraper.last_error)
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


def _start_log(opts: Any) -> LineFollower | None:
    """The server log's follower, started: --server-log-cmd's command, --server-log's file or `-` (stdin)."""
    path = getattr(opts, "server_log", "") or ""
    command = RUN.server_log_cmd  # as given at start-up, whatever the web UI's start form sent
    if (getattr(opts, "server_log_cmd", "") or "").strip() != command:
        _log.warning("stopstorm: ignored --server-log-cmd from the web UI (a shell command is taken from the "
                     "command line, environment or config file only); following %s", command or path or "no log")
    try:
        if command:
            return PipeLogFollower(command, on_problem=_log_problem).start()  # a problem is a line, not a raise
        if path == "-":
            return PipeLogFollower.stdin(on_problem=_log_problem).start()
        if path:
            return LogFollower(path, on_problem=_log_problem).start()  # from the file's end now: this run's lines
    except Exception as exc:
        _log.warning("stopstorm: following the server log %s failed: %s", command or path, exc)
    return None


def _log_problem(text: str) -> None:
    _log.warning("stopstorm: %s", text)


def _stop_log() -> LineFollower | None:
    """Stop following (a last read first; a command's output until it is quiet), drop the events stamped
    before the run (history a command replayed), and say so when the log named none of the run's requests."""
    follower, RUN.log = RUN.log, None
    if follower is not None:
        follower.stop()
        if RUN.started_wall is not None:
            follower.forget_before(RUN.started_wall)
        sent = {server_id(r) for r in RUN.records}
        if sent and not follower.matched(sent):
            follower.note(f"the server log ({follower.lines} lines) named none of this run's {len(sent)} requests: "
                          "is it this server's log, written with --enable-log-requests?")
    return follower


def _server_log_meta(follower: LineFollower, records: list[StreamRecord]) -> LogInfo:
    """The report's `server_log` block: what the follower read, and how many of its events name this run's
    requests (`matched`); `problems` are its lines saying what is missing."""
    return LogInfo.from_json({**follower.describe(), "matched": follower.matched(server_id(r) for r in records)})


def _fetch_ledger(host: str, settle_s: float = 1.0) -> tuple[LedgerSnapshot | None, int | None]:
    """The simulator's ledger once every request has left the engine (users killed at the end are closing
    theirs), or as it is after `settle_s`, and its `max_num_seqs`; (None, None) for a server without a ledger
    (real vLLM). One client, two requests: the stats say whether there is a ledger and how many slots."""
    client = LedgerClient(host)
    try:
        stats = client.stats()
        if stats is None:
            return None, None
        snapshot = client.wait_settled(settle_s)
        if snapshot is None:
            raise RuntimeError(f"cannot read the simulator ledger at {host}/stopstorm/ledger")
        return snapshot, max_num_seqs_of(stats)
    finally:
        client.close()


def _meta(env: Environment, duration: float, ledger: LedgerSnapshot | None, scraper: MetricsScraper | None,
          delta: Any, follower: LineFollower | None, gpu_off: str | None) -> RunMeta:
    """The run's facts for its report, from what this process's listeners kept."""
    opts = env.parsed_options
    clock = RUN.arrivals
    if clock is not None and clock.late:  # open model: too few users made the arrivals late
        _log.warning("stopstorm: %d of %d open-model arrivals went out late (no free user): raise -u",
                     clock.late, clock.arrivals)
    reason = stop_reason()
    return RunMeta(
        host=redact.redact_url(env.host or ""), locust_version=locust.__version__, started_at=RUN.started_wall,
        duration_s=duration,
        ledger_schema_version=ledger.schema_version if ledger is not None else None,
        options={k: getattr(opts, k) for k in _META_OPTIONS if hasattr(opts, k)},
        partial=reason is not None, partial_reason=reason,
        metrics=(ScrapeInfo(redact.redact_url(scraper.url), scraper.interval, scraper.scrapes, scraper.errors,
                            scraper.last_error, delta.duration if delta is not None else None)
                 if scraper is not None else None),
        server_log=_server_log_meta(follower, list(RUN.records)) if follower is not None else None,
        open_model=(OpenModelInfo(clock.rate, clock.arrivals, clock.late, clock.late_s) if clock is not None
                    else None),
        records=RecordsInfo(str(RUN.sink.path), RUN.sink.written) if RUN.sink is not None else None,
        distributed=distributed.workers_meta(env),
        gpu_off=gpu_off,
    )


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
        host = truth_host(env) if env.host else ""  # the server's truth, behind any proxy (--truth-url)
        ledger, max_num_seqs = _fetch_ledger(host) if host else (None, None)  # also lets the last aborts be logged
        follower = _stop_log()
        _stop_scraper()
        scraper, RUN.scraper = RUN.scraper, None
        delta = None
        if scraper is not None:
            delta = scraper.delta()
            scraper.close()
        end = RUN.stopped if RUN.stopped is not None else time.monotonic()
        readings, idle_pct, gpu_off = gpu.readings()
        report = build_report(RunInputs(
            records=list(RUN.records), meta=_meta(env, end - RUN.started, ledger, scraper, delta, follower, gpu_off),
            started=RUN.started, ended=end, ledger=ledger, metrics=delta, log=follower,
            max_num_seqs=max_num_seqs,
            self_monitor=self_monitor.summaries(), gpu=readings, gpu_idle_pct=idle_pct,
            gpu_files=gpu_file_names(path), planned_stacks=_planned_stacks(env),
            capacity_search=RUN.capacity_search))
        RUN.report = report
        write_report(path, report)
        if report.gpu is not None:
            write_gpu_files(report.gpu)
        html_path = write_html_report(path, report, taken=getattr(opts, "html_file", None))  # never over Locust's
        print(f"\n{format_report(report, path, str(html_path))}\n", flush=True)
    except Exception:
        _log.exception("stopstorm: the abort accounting failed; Locust's own results stand")
    finally:
        _stop_log()
        sink, RUN.sink = RUN.sink, None
        if sink is not None:
            sink.close()


def _planned_stacks(env: Environment) -> list[str]:
    """The client stacks of the run's user classes (their `stack`), for the summary's "which stacks ran"."""
    return [stack for cls in env.user_classes or () if (stack := getattr(cls, "stack", ""))]


def _report_so_far() -> Report:
    """A Report of the run until now, from its records and the simulator's ledger (no replay: it is live)."""
    env = RUN.environment
    host = (env.host if env is not None else "") or ""
    truth = truth_host(env) if host else ""  # the server's truth, behind any proxy (--truth-url)
    started = RUN.started if RUN.started is not None else time.monotonic()
    ledger = None
    if truth:
        client = LedgerClient(truth, timeout=2.0)
        try:
            ledger = client.ledger()
        finally:
            client.close()
    return build_report(RunInputs(records=list(RUN.records), meta=RunMeta(host=host), started=started,
                                  ended=RUN.stopped or time.monotonic(), ledger=ledger, counterfactuals=False))


_LIVE = LiveReport(_report_so_far)


def _tab_report() -> Report | None:
    """What the web UI's Stops tab shows: the run's Report once written, else the run so far."""
    if RUN.report is not None:
        return RUN.report
    return _LIVE.get() if RUN.started is not None else None


# Last: the run report above reads the simulator's ledger before this stops it.
events.quit.add_listener(embedded.stop_simulator)
