"""The run's lifecycle on Locust's events: importing this module registers every stopstorm listener, so a
locustfile needs one import (the shipped ones do it).

- init: every option checked (stopstorm/metrics/plugin/options.py: the report's, records' and simulator log's
  paths among them) before anything starts; with no `--host` the embedded simulator is started
  (plugin/embedded.py); then the target is checked (it answers, serves the model). A bad value or an unusable
  target stops the run before any load, the option named, exit 2. SIGINT and SIGTERM are taken over
  (plugin/signals.py).
- Locust master/worker mode (plugin/distributed.py): workers ship their records to the master, whose
  collection is the one below; only the master (or the single process) scrapes, reads the ledger, reports.
- test_start begins a run from zero (the web UI may start several in one process): its records, its
  `--stopstorm-records` file, `{host}/metrics` scraped in the background every `--metrics-interval` seconds
  (its first and latest good snapshots give the vLLM counters' delta; a host without /metrics only counts
  errors), and with `--server-log PATH` (`-`: standard input) or `--server-log-cmd CMD` (a command whose output
  is the log, run by the master in its own process group) vLLM's request log followed (per-request abort
  confirmation, each line stamped as it is read; events stamped before the run dropped).
- test_stop ends it, whatever ended it (headless `-t`, the web UI's Stop or its run time, a signal, the load
  shape): the simulator's ledger is read (this run's requests only), the run accounted
  (metrics/analysis/accounting.py), its `--fail-on` thresholds judged (metrics/analysis/thresholds.py), and its
  JSON and HTML written atomically; a web-UI run's files are numbered (`stopstorm-report-run2.json`) and linked
  from the UI's Download data tab. A run is partial exactly when a signal came before its end began.
- quit prints the latest run's summary after Locust's own (headless), and the exit status says what a CI needs:
  `EXIT_CUT_SHORT` (4) when a signal cut the run, `EXIT_THRESHOLD_BROKEN` (3) when a threshold broke, else
  Locust's own. Locust runs its shutdown twice after a SIGTERM (the signal's greenlet and its main one): the
  second waits here for the first, which exits the process once the report is written.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gevent
import locust
from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner

from stopstorm.metrics import redact
from stopstorm.metrics.analysis import thresholds
from stopstorm.metrics.analysis.accounting import server_id
from stopstorm.metrics.plugin import (
    distributed,
    embedded,
    gpu,
    locust_stats,
    options,
    probe,
    self_monitor,
    signals,
)
from stopstorm.metrics.plugin.ledger_drain import LedgerDrain
from stopstorm.metrics.plugin.record_sink import RecordStore
from stopstorm.metrics.plugin.spool import JsonlSpool
from stopstorm.metrics.plugin.state import RUN
from stopstorm.metrics.plugin.truth_target import truth_host
from stopstorm.metrics.plugin.web_form import install_form_check, install_secret_fields
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

__all__ = ["EXIT_CUT_SHORT", "EXIT_THRESHOLD_BROKEN", "embedded_simulator", "run_path"]

EXIT_CUT_SHORT = signals.EXIT_CUT_SHORT
EXIT_THRESHOLD_BROKEN = thresholds.EXIT_THRESHOLD_BROKEN
REPORT_WAIT_S = 300.0  # how long a second shutdown, or the next web-UI run, waits for a report being written

embedded_simulator = embedded.embedded_simulator
_log = logging.getLogger("stopstorm")
_ = (probe, gpu)  # imported for their listeners
# Options worth keeping in the report's meta (never the API key).
_META_OPTIONS = ("num_users", "spawn_rate", "run_time", "endpoint", "model", "max_tokens", "ignore_eos",
                 "stop_probability", "stop_at", "close_mix", "hold_seconds", "think_time", "sim_max_num_seqs",
                 "sim_args", "arrival_rate")


DEFAULT_REPORT = "stopstorm-report.json"


def _check_report_path(path: str) -> None:
    """The JSON's path, and its HTML page's beside it (same folder; written by rename, so only a directory in
    its place could stop it), before any load: found after the run, the summary would be lost."""
    options.check_writable("--stopstorm-report", path)
    page = Path(path).with_suffix(".html")
    if page.is_dir():
        raise ValueError(f"--stopstorm-report {path}: its HTML page {page} would go where a directory is")

TABLE = options.OptionTable("stopstorm report", options=(
    options.Option("--stopstorm-report", "where to write the run's abort accounting as JSON; its summary is printed "
                   f"after Locust's (default {DEFAULT_REPORT})", DEFAULT_REPORT,
                   options.Parsed(lambda p: _check_report_path(p or DEFAULT_REPORT),
                                  "a file path stopstorm can write (the HTML goes beside it)"),
                   env="STOPSTORM_REPORT", master_only=True),
    options.Option("--stopstorm-records", "also write every stream's record to this JSONL file as the stream ends "
                   "(flushed, so a killed run keeps them; truncated at start; default: not written)", "",
                   options.WritablePath(optional=True), env="STOPSTORM_RECORDS", master_only=True),
    options.Option("--fail-on", "a threshold that fails the run, e.g. zombie_slot_seconds>0, abort_latency.p99>0.05, "
                   "failed_ratio>0.01 (repeat it, or separate with commas): judged on the run's final report, each "
                   "printed held or broken; any broken one makes the exit status 3 (4: a signal cut the run short). "
                   "See docs/guides/ci-gating.md", None,
                   options.Parsed(thresholds.parse_thresholds, "FIGURE OP NUMBER, e.g. zombies[openai/*]>0",
                                  optional=True),
                   env="STOPSTORM_FAIL_ON", master_only=True, repeat=True),
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




def run_path(path: str | Path, number: int, web_ui: bool) -> Path:
    """Where run `number` of this process writes `path`'s file: as given for a headless run, numbered for each
    run of the web UI (`stopstorm-report.json` → `stopstorm-report-run2.json`), so no run overwrites another."""
    p = Path(path)
    return p.with_name(f"{p.stem}-run{number}{p.suffix}") if web_ui else p


def _web_ui(env: Environment | None) -> bool:
    return env is not None and getattr(env, "web_ui", None) is not None


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
    signals.install_stop_signals()  # every process: a worker's Ctrl-C ends it cleanly too
    if not worker and environment.stats is not None:  # a worker's counters are reset at each report
        locust_stats.start_trimming(environment.stats)  # Locust's per-second counters: flat over hours
    signals.on_force(_drop_empty_spools, lost=_what_a_forced_exit_loses)
    distributed.install(environment, lambda record: _collect_record(context={"record": record}))
    if _web_ui(environment):
        install_stops_tab(environment.web_ui, _tab_report)
        _install_report_links(environment.web_ui)
        shown = {o.dest for table in options.tables() for o in table if o.in_web_ui}
        install_secret_fields(environment.web_ui, {o.dest for table in options.tables() for o in table if o.secret})
        install_form_check(environment.web_ui, shown, options.check_options)  # the form's values: the same rules


def _what_a_forced_exit_loses() -> str:
    if RUN.in_progress:
        return f"run {RUN.runs}'s report (JSON, HTML and summary, not written){_spools_left()}"
    if RUN.simulator is not None:
        return "nothing of the report (written); the embedded simulator was killed by PID"
    return "nothing (every run's report was written)"


def _spools() -> list[tuple[JsonlSpool[Any], str]]:
    """The run's spools: its records and the ledger entries drained so far (with a forgetting simulator, the
    only copy of that server truth)."""
    drain = RUN.ledger
    return [(RUN.records, "records"), *([(drain.spool, "ledger entries")] if drain is not None else [])]


def _spools_left() -> str:
    return "".join(f"; its {spool.written} {what} so far are in {spool.path}" for spool, what in _spools()
                   if spool.written)


def _drop_empty_spools() -> None:
    """A forced exit leaves a spool that holds something (named in its message) for the user; an empty one of
    ours goes."""
    for spool, _what in _spools():
        if not spool.written and not spool.kept:
            spool.discard()


@events.request.add_listener
def _collect_record(context: dict[str, Any] | None = None, **_kwargs: Any) -> None:
    if RUN.collects and context and isinstance(context.get("record"), StreamRecord):
        RUN.records.append(context["record"])  # on disk until the report (metrics/plugin/record_sink.py)


def _wait_for_report(what: str) -> None:
    """A report is being written (in another greenlet): let it finish first, within REPORT_WAIT_S."""
    deadline = time.monotonic() + REPORT_WAIT_S
    if RUN.reporting:
        _log.info("stopstorm: %s waits for run %d's report", what, RUN.runs)
    while RUN.reporting and time.monotonic() < deadline:
        gevent.sleep(0.05)


@events.test_start.add_listener
def _run_started(environment: Environment, **_kwargs: Any) -> None:
    if not RUN.collects:
        return
    if RUN.started is not None and not RUN.reported:
        return  # this run already began (Locust fires test_start once per run; a master may see it again)
    _wait_for_report("the next run")
    number = RUN.begin_run()
    RUN.started, RUN.started_wall = time.monotonic(), time.time()
    opts = environment.parsed_options
    web_ui = _web_ui(environment)
    RUN.records = _record_store(getattr(opts, "stopstorm_records", "") or "", number, web_ui)
    if web_ui:
        _log.info("stopstorm: run %d started; its report will be %s", number,
                  run_path(getattr(opts, "stopstorm_report", "") or DEFAULT_REPORT, number, True))
    RUN.log = _start_log(opts)
    if environment.host:
        RUN.ledger = _start_ledger_drain(environment)
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


def _start_ledger_drain(environment: Environment) -> LedgerDrain | None:
    """The simulator's ledger, read as the run goes (metrics/plugin/ledger_drain.py); None for a server
    without it (real vLLM) or a run whose users read ledger entries themselves as they go (the stop probe):
    a forgetting simulator would drop them under their feet. Such a ledger is read whole at the end."""
    if any(getattr(cls, "reads_ledger_entries", False) for cls in environment.user_classes or ()):
        return None
    try:
        truth = truth_host(environment)
        drain = LedgerDrain.open(truth, RUN.ledger_after.get(truth, 0))
    except Exception as exc:
        _log.warning("stopstorm: reading the simulator's ledger as the run goes failed (%s); read at the end", exc)
        return None
    if drain is not None:
        RUN.ledger_after[truth] = drain.after
        drain.start()
    return drain


def _record_store(records_path: str, number: int, web_ui: bool) -> RecordStore:
    """Where this run keeps its records until the report: the --stopstorm-records file, else a spool in the
    temp folder; memory only when neither can be made (said), so the report still gets every record."""
    if records_path:
        try:
            return RecordStore(run_path(records_path, number, web_ui))
        except OSError as exc:  # checked writable at init; gone since
            _log.error("stopstorm: --stopstorm-records %s: cannot write there (%s); records are spooled instead",
                       records_path, exc.strerror or exc)
    try:
        return RecordStore()
    except OSError as exc:
        _log.error("stopstorm: no record spool in %s (%s); this run's records are kept in memory",
                   tempfile.gettempdir(), exc.strerror or exc)
        return RecordStore(spool=False)


@events.test_stopping.add_listener
def _run_stopping(**_kwargs: Any) -> None:
    """The run's end has begun (-t, Stop, the shape, a signal): a signal after this does not cut it short."""
    if RUN.collects and RUN.started is not None and RUN.stopping is None:
        RUN.stopping = time.monotonic()


@events.test_stop.add_listener
def _run_stopped(**_kwargs: Any) -> None:
    """The run has ended, whatever ended it: its report, now."""
    if not RUN.collects or RUN.started is None or RUN.reported or RUN.reporting:
        return  # not collecting, no run, or this run's report is written or being written (a second stop)
    if RUN.stopping is None:
        RUN.stopping = time.monotonic()
    if RUN.stopped is None:
        RUN.stopped = time.monotonic()
    _stop_scraper()
    _write_run_report()


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


def _stop_log(records: Iterable[StreamRecord] = ()) -> LineFollower | None:
    """Stop following (a last read first; a command's output until it is quiet), drop the events stamped
    before the run (history a command replayed), and say so when the log named none of the run's `records`."""
    follower, RUN.log = RUN.log, None
    if follower is not None:
        follower.stop()
        if RUN.started_wall is not None:
            follower.forget_before(RUN.started_wall)
        sent = {server_id(r) for r in records}
        if sent and not follower.matched(sent):
            follower.note(f"the server log ({follower.lines} lines) named none of this run's {len(sent)} requests: "
                          "is it this server's log, written with --enable-log-requests?")
    return follower


def _server_log_meta(follower: LineFollower, records: list[StreamRecord]) -> LogInfo:
    """The report's `server_log` block: what the follower read, and how many of its events name this run's
    requests (`matched`); `problems` are its lines saying what is missing."""
    return LogInfo.from_json({**follower.describe(), "matched": follower.matched(server_id(r) for r in records)})


def _this_run(snapshot: LedgerSnapshot, since: float | None) -> LedgerSnapshot:
    """The entries of this run: those that arrived after the previous run's last reading (on the ledger's own
    clock, so no clock is compared across hosts); the whole ledger for a process's first run."""
    if since is None:
        return snapshot
    return LedgerSnapshot(snapshot.now, tuple(e for e in snapshot.entries if e.arrival > since),
                          snapshot.schema_version, snapshot.epoch_offset)


def _fetch_ledger(host: str, settle_s: float = 1.0) -> tuple[LedgerSnapshot | None, int | None]:
    """The simulator's ledger once every request has left the engine (users killed at the end are closing
    theirs), or as it is after `settle_s`, and its `max_num_seqs`; (None, None) for a server without a ledger
    (real vLLM). The stats say whether there is a ledger and how many slots; the entries come from the run's
    drain (what it read as the run went, and the rest now) or, without one, from one whole read."""
    client = LedgerClient(host)
    drain, RUN.ledger = RUN.ledger, None
    try:
        stats = client.stats()
        if stats is None:
            if drain is not None and len(drain):
                _log.warning("stopstorm: the simulator at %s no longer answers; the %d ledger entries read "
                             "during the run are not used (the rest of its truth is gone)", host, len(drain))
            return None, None
        if drain is not None:
            snapshot = drain.settled(settle_s)
            RUN.ledger_after[drain.host] = drain.after
            if snapshot is None:
                raise RuntimeError(f"cannot read the simulator ledger at {host}/stopstorm/ledger/settled "
                                   f"({len(drain)} entries read before it stopped answering)")
        else:
            snapshot = client.wait_settled(settle_s)
        if snapshot is None:
            raise RuntimeError(f"cannot read the simulator ledger at {host}/stopstorm/ledger")
        return snapshot, max_num_seqs_of(stats)
    finally:
        client.close()
        if drain is not None:  # what it read is in the snapshot now, or of no use
            drain.discard()


def _meta(env: Environment, duration: float, ledger: LedgerSnapshot | None, scraper: MetricsScraper | None,
          delta: Any, follower: LineFollower | None, gpu_off: str | None, records: list[StreamRecord]) -> RunMeta:
    """The run's facts for its report, from what this process's listeners kept."""
    opts = env.parsed_options
    clock = RUN.arrivals
    if clock is not None and clock.late:  # open model: too few users made the arrivals late
        _log.warning("stopstorm: %d of %d open-model arrivals went out late (no free user): raise -u",
                     clock.late, clock.arrivals)
    reason = signals.stop_reason(before=RUN.stopping)
    return RunMeta(
        host=redact.redact_url(env.host or ""), locust_version=locust.__version__, started_at=RUN.started_wall,
        duration_s=duration,
        ledger_schema_version=ledger.schema_version if ledger is not None else None,
        options={k: getattr(opts, k) for k in _META_OPTIONS if hasattr(opts, k)},
        partial=reason is not None, partial_reason=reason,
        metrics=(ScrapeInfo(redact.redact_url(scraper.url), scraper.interval, scraper.scrapes, scraper.errors,
                            scraper.last_error, delta.duration if delta is not None else None)
                 if scraper is not None else None),
        server_log=_server_log_meta(follower, records) if follower is not None else None,
        open_model=(OpenModelInfo(clock.rate, clock.arrivals, clock.late, clock.late_s) if clock is not None
                    else None),
        records=RecordsInfo(str(RUN.records.path), RUN.records.written) if RUN.records.kept else None,
        distributed=distributed.workers_meta(env),
        gpu_off=gpu_off,
    )


_LEDGER_MARK: list[float] = []  # the ledger's `now` at the previous run's reading (runs ≥ 2 read after it)


def _write_run_report() -> None:
    """This run's report: the ledger read (before the simulator stops), the accounting, the thresholds, the
    JSON and HTML written atomically. Never raises: Locust's own results stand whatever happens here."""
    env = RUN.environment
    if env is None or not RUN.collects or RUN.started is None or RUN.reported or RUN.reporting:
        return
    if probe.PROBE.active:  # the probe writes its own report, from its own streams (metrics/plugin/probe.py)
        RUN.records.discard()  # so this run's record spool is not needed (a --stopstorm-records file stays)
        return
    RUN.reporting = True
    number = RUN.runs
    try:
        opts = env.parsed_options
        web_ui = _web_ui(env)
        path = run_path(getattr(opts, "stopstorm_report", "") or DEFAULT_REPORT, number, web_ui)
        host = truth_host(env) if env.host else ""  # the server's truth, behind any proxy (--truth-url)
        ledger, max_num_seqs = _fetch_ledger(host) if host else (None, None)  # also lets the last aborts be logged
        if ledger is not None:
            since = _LEDGER_MARK[-1] if _LEDGER_MARK else None
            _LEDGER_MARK.append(ledger.now)
            ledger = _this_run(ledger, since)
        RUN.records.close()  # every stream has ended: the users are gone (a straggler's record is kept in memory)
        records = list(RUN.records)  # read back once, for the report
        follower = _stop_log(records)
        _stop_scraper()
        scraper, RUN.scraper = RUN.scraper, None
        delta = None
        if scraper is not None:
            delta = scraper.delta()
            scraper.close()
        end = RUN.stopped if RUN.stopped is not None else time.monotonic()
        readings, idle_pct, gpu_off = gpu.readings()
        report = build_report(RunInputs(
            records=records, meta=_meta(env, end - RUN.started, ledger, scraper, delta, follower, gpu_off, records),
            started=RUN.started, ended=end, ledger=ledger, metrics=delta, log=follower,
            max_num_seqs=max_num_seqs,
            self_monitor=self_monitor.summaries(), gpu=readings, gpu_idle_pct=idle_pct,
            gpu_files=gpu_file_names(str(path)), planned_stacks=_planned_stacks(env),
            capacity_search=RUN.capacity_search))
        report = _judge(report, opts)
        RUN.report = report
        write_report(path, report)
        if report.gpu is not None:
            write_gpu_files(report.gpu)
        html_path = write_html_report(path, report, taken=getattr(opts, "html_file", None))  # never over Locust's
        RUN.report_path = path
        RUN.written.append((number, path, html_path))
        text = format_report(report, str(path), str(html_path))
        verdicts = thresholds.result_lines(report.thresholds)
        RUN.summary = f"{text}\n\n{verdicts}" if verdicts else text
        if web_ui:  # no Locust summary to follow: said now, with the run's number
            print(f"\nstopstorm run {number}:\n{RUN.summary}\n", flush=True)
        RUN.records.discard()  # the report has them; a spool of ours goes (a --stopstorm-records file stays)
    except Exception:
        _log.exception("stopstorm: the abort accounting failed; Locust's own results stand")
        if RUN.records.written:
            _log.error("stopstorm: run %d's %d records are kept in %s", number, RUN.records.written,
                       RUN.records.path)
    finally:
        _stop_log()
        RUN.records.close()
        if RUN.ledger is not None:  # not read (no host to read it at, or the report failed before it)
            RUN.ledger.discard()
            RUN.ledger = None
        RUN.reported = True
        RUN.reporting = False



def _judge(report: Report, opts: Any) -> Report:
    """The run's --fail-on thresholds judged on its Report (parsed at init: a bad one never got this far)."""
    try:
        wanted = thresholds.parse_thresholds(getattr(opts, "fail_on", None))
    except ValueError as exc:  # only from a namespace the init check never saw (an embedded Environment)
        _log.error("stopstorm: %s", exc)
        return report
    if not wanted:
        return report
    results = thresholds.evaluate(wanted, report.accounting, report.capacity, report.gpu)
    if not all(r.held for r in results):
        RUN.thresholds_broken = True
        env = RUN.environment
        if env is not None and signals.stop_reason(before=RUN.stopping) is None:
            env.process_exit_code = EXIT_THRESHOLD_BROKEN  # read by Locust's shutdown (a cut run's is set there)
    return replace(report, thresholds=results)


@dataclass
class _Shutdown:
    began: bool = False


_SHUTDOWN = _Shutdown()


@events.quitting.add_listener
def _one_shutdown(environment: Environment, **_kwargs: Any) -> None:
    """The first of Locust's shutdowns goes on (after a report being written, e.g. for a web-UI Stop, is done);
    a second one (Locust runs two after a SIGTERM) waits here until the first exits the process. The exit status
    is set here, before Locust reads it: a run a signal cut short, else a broken threshold."""
    if _SHUTDOWN.began:
        deadline = time.monotonic() + REPORT_WAIT_S
        while time.monotonic() < deadline:  # the first one's exit ends this wait (SystemExit thrown in here)
            gevent.sleep(0.5)
        return
    _SHUTDOWN.began = True
    _wait_for_report("Locust's shutdown")
    if not RUN.collects:
        return
    cut = RUN.in_progress and signals.stop_reason(before=RUN.stopping) is not None
    if cut:
        environment.process_exit_code = EXIT_CUT_SHORT
    elif RUN.thresholds_broken:
        environment.process_exit_code = EXIT_THRESHOLD_BROKEN


@events.quit.add_listener
def _print_summary(**_kwargs: Any) -> None:
    """After Locust's own stats (and the probe's table); before the simulator stops, so a run that never saw its
    test_stop (a fallback: Locust fires it on every path known) still reads its ledger."""
    if RUN.collects and RUN.in_progress:
        if RUN.stopped is None:
            RUN.stopped = time.monotonic()
        _write_run_report()
    _stop_log()
    if RUN.collects and RUN.summary is not None and not _web_ui(RUN.environment):
        print(f"\n{RUN.summary}\n", flush=True)
    if RUN.collects and RUN.thresholds_broken:
        env = RUN.environment
        if env is not None and env.process_exit_code is None:
            env.process_exit_code = EXIT_THRESHOLD_BROKEN


def _planned_stacks(env: Environment) -> list[str]:
    """The client stacks of the run's user classes (their `stack`), for the summary's "which stacks ran"."""
    return [stack for cls in env.user_classes or () if (stack := getattr(cls, "stack", ""))]


def ledger_so_far(truth: str) -> LedgerSnapshot | None:
    """The simulator's ledger until now: the run's drain (what it read, and what is in flight), else one whole
    read. For views during the run (the Stops tab, capacity.py's steps); None when it cannot be read."""
    drain = RUN.ledger
    if drain is not None:
        return drain.snapshot()
    client = LedgerClient(truth, timeout=2.0)
    try:
        return client.ledger()
    finally:
        client.close()


def _report_so_far() -> Report:
    """A Report of the run until now, from its records and the simulator's ledger (no replay: it is live)."""
    env = RUN.environment
    host = (env.host if env is not None else "") or ""
    truth = truth_host(env) if host else ""  # the server's truth, behind any proxy (--truth-url)
    started = RUN.started if RUN.started is not None else time.monotonic()
    ledger = None
    if truth:
        ledger = ledger_so_far(truth)
        if ledger is not None:
            ledger = _this_run(ledger, _LEDGER_MARK[-1] if _LEDGER_MARK else None)
    return build_report(RunInputs(records=list(RUN.records), meta=RunMeta(host=host), started=started,
                                  ended=RUN.stopped or time.monotonic(), ledger=ledger, counterfactuals=False))


_LIVE = LiveReport(_report_so_far)


def _tab_report() -> Report | None:
    """What the web UI's Stops tab shows: the run so far while one runs, else the latest run's Report."""
    if RUN.in_progress and not RUN.reporting:
        return _LIVE.get()
    return RUN.report


def _install_report_links(web_ui: Any) -> None:
    """The Download data tab links each run's report once written: `/stopstorm/report` (the latest run's HTML),
    `/stopstorm/report.json`, and `/stopstorm/reports` (every run of this process)."""
    web_ui.template_args["extendedCsvFiles"] = [
        *web_ui.template_args.get("extendedCsvFiles", []),
        {"href": "./stopstorm/report", "title": "stopstorm report, latest run (HTML)"},
        {"href": "./stopstorm/report.json", "title": "stopstorm report, latest run (JSON)"},
        {"href": "./stopstorm/reports", "title": "stopstorm reports, every run"},
    ]
    guard = getattr(web_ui, "auth_required_if_enabled", lambda view: view)

    def latest(kind: str) -> Any:
        from flask import Response, send_file

        if not RUN.written:
            state = "is running" if RUN.in_progress else "has not started"
            return Response(f"no stopstorm report yet: the first run {state}", status=404, mimetype="text/plain")
        _, json_path, html_path = RUN.written[-1]
        target = html_path if kind == "html" else json_path
        return send_file(Path(target).resolve(), mimetype="text/html" if kind == "html" else "application/json")

    def every() -> Any:
        from html import escape

        from flask import Response

        rows = "".join(f"<li>run {n}: <a href='./report/{n}'>{escape(str(h))}</a> "
                       f"(<a href='./report/{n}.json'>{escape(str(j))}</a>)</li>" for n, j, h in RUN.written)
        return Response(f"<!doctype html><title>stopstorm reports</title><h1>stopstorm reports</h1>"
                        f"<ul>{rows or '<li>none yet</li>'}</ul>", mimetype="text/html")

    def one(number: str) -> Any:
        from flask import send_file

        n, _, kind = number.partition(".")
        for run, json_path, html_path in RUN.written:
            if n.isdigit() and int(n) == run:
                target = json_path if kind == "json" else html_path
                return send_file(Path(target).resolve(),
                                 mimetype="application/json" if kind == "json" else "text/html")
        return by_name(number)

    def by_name(name: str) -> Any:
        """A written JSON by its file name: the link each HTML page has to its data, relative to where it is
        served (`/stopstorm/report` and `/stopstorm/report/<n>`). Only files this process wrote."""
        from flask import Response, send_file

        for _, json_path, _ in RUN.written:
            if Path(json_path).name == name:
                return send_file(Path(json_path).resolve(), mimetype="application/json")
        return Response(f"no report named {name}", status=404, mimetype="text/plain")

    app = web_ui.app
    app.add_url_rule("/stopstorm/report", "stopstorm_report_html", guard(lambda: latest("html")))
    app.add_url_rule("/stopstorm/report.json", "stopstorm_report_json", guard(lambda: latest("json")))
    app.add_url_rule("/stopstorm/reports", "stopstorm_reports", guard(every))
    app.add_url_rule("/stopstorm/report/<number>", "stopstorm_report_run", guard(one))
    app.add_url_rule("/stopstorm/<name>", "stopstorm_report_data", guard(by_name))


# Last: the run report above reads the simulator's ledger before this stops it.
events.quit.add_listener(embedded.stop_simulator)
