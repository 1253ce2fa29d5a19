"""Every Locust event hook stopstorm registers, in one module, so the locustfile stays a table of contents.

- Command-line options: the users' (users/options.py), the probe's, and the embedded simulator's.
- The embedded simulator: with no `--host`, the run starts one (in its own process, on a free loopback port),
  points the run at it, and stops it when Locust quits (normal end, Ctrl-C, SIGTERM or an error).
- Bad settings stop the run before any load, with the option named.
- The stop-semantics probe's table, printed after Locust's own summary and saved as JSON.
- Locust master/worker mode (metrics/distributed.py): workers ship their records to the master, whose
  collection is the one below; only the master (or the single process) scrapes, reads the ledger, reports.
- Abort accounting: every stream's record is kept (from the `request` event's context); `{host}/metrics` is
  scraped in the background every `--metrics-interval` seconds from test_start to test_stop (its first and
  latest good snapshots give the vLLM counters' delta; a host without /metrics only counts errors); with
  `--server-log PATH` vLLM's request log is followed from test_start to quit (per-request abort confirmation,
  each line stamped as it is read); at quit the simulator's ledger is fetched once (before the simulator
  stops), the run is accounted (metrics/accounting.py), its summary printed after Locust's and its JSON written.
"""

from __future__ import annotations

import atexit
import logging
import shlex
import time
from typing import Any

import locust
from locust import events
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import WorkerRunner

from metrics import distributed, gpu_hooks
from metrics.accounting import account, ledger_by_id
from metrics.capacity_section import capacity_section, server_max_num_seqs
from metrics.html_report import write_html_report
from metrics.record import StreamRecord
from metrics.record_sink import RecordSink
from metrics.run_report import format_summary, to_json, write_report
from metrics.run_stop import install_stop_signals, stop_reason
from metrics.self_monitor import SelfMonitor, from_options, process_key, warnings_for
from metrics.self_monitor import add_arguments as add_self_monitor_arguments
from metrics.truth import LedgerClient
from metrics.vllm_log import LogFollower
from metrics.vllm_metrics_scrape import MetricsScraper
from metrics.web_stops import install_stops_tab
from simulator.launcher import EmbeddedSimulator
from users.options import add_arguments as add_user_arguments
from users.options import settings_for
from users.probe import add_probe_arguments, probe_results, probe_truth_source, write_probe_results
from users.shapes import add_shape_arguments, arrival_clock

__all__ = ["embedded_simulator"]

_log = logging.getLogger("stopstorm")
_state: dict[str, EmbeddedSimulator] = {}
_records: list[StreamRecord] = []
_run: dict[str, Any] = {}  # env, collect (bool), started/stopped (monotonic), started_wall, scraper, log, log
# Options worth keeping in the report's meta (never the API key).
_META_OPTIONS = ("num_users", "spawn_rate", "run_time", "endpoint", "model", "max_tokens", "ignore_eos",
                 "stop_probability", "stop_at", "close_mix", "hold_seconds", "think_time", "sim_max_num_seqs",
                 "sim_args", "arrival_rate")


@events.init_command_line_parser.add_listener
def _add_arguments(parser: LocustArgumentParser) -> None:
    add_user_arguments(parser)
    add_probe_arguments(parser)
    add_self_monitor_arguments(parser)
    add_shape_arguments(parser)
    group = parser.add_argument_group("stopstorm embedded simulator", "used when no --host is given")
    group.add_argument("--sim-max-num-seqs", type=int, default=2, env_var="STOPSTORM_SIM_MAX_NUM_SEQS",
                       help="running slots of the embedded simulator, as vLLM's --max-num-seqs (default 2)")
    group.add_argument("--sim-args", default="", env_var="STOPSTORM_SIM_ARGS",
                       help="more flags for the embedded simulator, e.g. \"--step-base-ms 20 --seed 1\" "
                       "(see python -m simulator --help)")
    group.add_argument("--sim-log", default="", env_var="STOPSTORM_SIM_LOG",
                       help="file for the embedded simulator's vLLM-like request log (default: a temp file)")
    report = parser.add_argument_group("stopstorm report")
    report.add_argument(
        "--stopstorm-report", default="stopstorm-report.json", env_var="STOPSTORM_REPORT",
        help="where to write the run's abort accounting as JSON; its summary is printed after Locust's "
        "(default stopstorm-report.json)")
    report.add_argument(
        "--stopstorm-records", default="", env_var="STOPSTORM_RECORDS",
        help="also write every stream's record to this JSONL file as the stream ends (flushed, so a killed run "
        "keeps them; truncated at start; default: not written)")
    report.add_argument(
        "--server-log", default="", env_var="STOPSTORM_SERVER_LOG",
        help="vLLM's log file (run it with --enable-log-requests), followed during the run to confirm each "
        "stopped stream's abort; the embedded simulator's log (--sim-log) works too")
    report.add_argument(
        "--metrics-interval", type=float, default=0.25, env_var="STOPSTORM_METRICS_INTERVAL",
        help="seconds between scrapes of {host}/metrics during the run (default 0.25)")


def embedded_simulator() -> EmbeddedSimulator | None:
    """The simulator this process started, if any."""
    return _state.get("sim")


def _stop_simulator(**_kwargs: Any) -> None:
    sim = _state.pop("sim", None)
    if sim is not None:
        code = sim.stop()
        _log.info("stopped the embedded simulator (exit status %s); its log: %s", code, sim.log_path)


@events.init.add_listener
def _start_simulator(environment: Environment, **_kwargs: Any) -> None:
    if environment.host or isinstance(environment.runner, WorkerRunner):
        return
    opts = environment.parsed_options
    args = ["--max-num-seqs", str(getattr(opts, "sim_max_num_seqs", 2)), *shlex.split(getattr(opts, "sim_args", ""))]
    sim = EmbeddedSimulator(args, log_path=getattr(opts, "sim_log", "") or None)
    url = sim.start()
    _state["sim"] = sim
    atexit.register(_stop_simulator)
    environment.host = url
    if opts is not None:
        opts.host = url
    _log.info("no --host given: started the embedded simulator at %s (pid %s, %s); its log: %s",
              url, sim.pid, " ".join(args), sim.log_path)


@events.init.add_listener
def _check_settings(environment: Environment, **_kwargs: Any) -> None:
    """Refuse bad options before any load; workers get theirs checked by the master first."""
    if not environment.host or isinstance(environment.runner, WorkerRunner):
        return
    try:
        settings_for(environment, environment.host)
    except ValueError as exc:
        _log.error("stopstorm: %s", exc)
        _stop_simulator()
        raise SystemExit(2) from None


@events.quit.add_listener
def _print_probe_table(**_kwargs: Any) -> None:
    env = _run.get("env")
    if not probe_results() or env is None:
        return
    path = env.parsed_options.probe_json
    table = write_probe_results(path, env.host)
    print(f"\nstopstorm stop-semantics probe (truth: {probe_truth_source()}; JSON: {path})\n{table}\n", flush=True)


@events.init.add_listener
def _start_collecting(environment: Environment, **_kwargs: Any) -> None:
    _run["env"] = environment
    # Workers keep nothing: they ship their records to the master, which feeds them to _collect_record.
    _run["collect"] = not isinstance(environment.runner, WorkerRunner)
    if _run["collect"]:
        install_stop_signals()
        path = getattr(environment.parsed_options, "stopstorm_records", "") or ""
        if path:
            _run["sink"] = RecordSink(path)
    distributed.install(environment, lambda record: _collect_record(context={"record": record}))
    if getattr(environment, "web_ui", None) is not None:
        install_stops_tab(environment.web_ui, lambda: environment.host or "", lambda: _records)


@events.request.add_listener
def _collect_record(context: dict[str, Any] | None = None, **_kwargs: Any) -> None:
    if _run.get("collect") and context and isinstance(context.get("record"), StreamRecord):
        record: StreamRecord = context["record"]
        _records.append(record)
        sink = _run.get("sink")
        if sink is not None:
            try:
                sink.write(record)
            except OSError as exc:  # the run goes on; the report still gets every record
                _log.error("stopstorm: writing %s failed (%s); records go on to the report only", sink.path, exc)
                _run.pop("sink").close()
        record.compact()  # kept until the report: its per-chunk marks packed (benchmarks/bench_soak.py)


@events.test_start.add_listener
def _run_started(environment: Environment, **_kwargs: Any) -> None:
    if not _run.get("collect") or "started" in _run:
        return
    _run["started"], _run["started_wall"] = time.monotonic(), time.time()
    opts = environment.parsed_options
    log_path = getattr(opts, "server_log", "") or ""
    if log_path:
        try:
            _run["log"] = LogFollower(log_path).start()  # from the file's end now: this run's lines only
        except Exception as exc:
            _log.warning("stopstorm: following the server log %s failed: %s", log_path, exc)
    if environment.host:
        try:
            interval = float(getattr(opts, "metrics_interval", 0.25) or 0.25)
            scraper = MetricsScraper(f"{environment.host.rstrip('/')}/metrics", interval=interval, timeout=2.0)
            if scraper.scrape_once() is None:  # a reading at the start, before the greenlet's first
                _log.info("stopstorm: no /metrics at %s yet (%s); scraping on, errors counted",
                          environment.host, scraper.last_error)
            scraper.start()
            _run["scraper"] = scraper
        except Exception as exc:
            _log.warning("stopstorm: scraping /metrics failed: %s", exc)


@events.test_stop.add_listener
def _run_stopped(**_kwargs: Any) -> None:
    _run.setdefault("stopped", time.monotonic())
    _stop_scraper()


def _stop_scraper() -> None:
    """Stop the background scrapes, with one last reading; the scraper is kept for the report."""
    scraper = _run.get("scraper")
    if scraper is not None and scraper.alive:
        scraper.stop()
        scraper.scrape_once()


def _stop_log() -> LogFollower | None:
    follower = _run.pop("log", None)
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
    env = _run.get("env")
    if env is None or not _run.get("collect") or "started" not in _run or _run.get("reported"):
        _stop_log()  # (after SIGTERM Locust's shutdown runs twice: the report is written once)
        return
    _run["reported"] = True
    try:
        opts = env.parsed_options
        path = getattr(opts, "stopstorm_report", "") or "stopstorm-report.json"
        host = env.host or ""
        ledger_doc = _fetch_ledger(host) if host else None  # also lets the users' last aborts reach the log
        follower = _stop_log()
        _stop_scraper()
        scraper = _run.pop("scraper", None)
        delta = None
        if scraper is not None:
            delta = scraper.delta()
            scraper.close()
        end = _run.get("stopped", time.monotonic())
        duration = end - _run["started"]
        accounting = account(list(_records), ledger_by_id(ledger_doc) if ledger_doc is not None else None, delta,
                             duration, run_end=ledger_doc.get("now") if ledger_doc is not None else None,
                             log=follower)
        meta = {"host": host, "locust_version": locust.__version__, "started_at": _run["started_wall"],
                "duration_s": duration, "ledger_schema_version": (ledger_doc or {}).get("schema_version"),
                "options": {k: getattr(opts, k) for k in _META_OPTIONS if hasattr(opts, k)}}
        if scraper is not None:
            meta["metrics"] = {"url": scraper.url, "interval_s": scraper.interval, "scrapes": scraper.scrapes,
                               "errors": scraper.errors, "last_error": scraper.last_error,
                               "window_s": delta.duration if delta is not None else None}
        if (workers := distributed.workers_meta(env)) is not None:
            meta["distributed"] = workers
        if follower is not None:
            meta["server_log"] = {"path": follower.path, "lines": follower.lines, "events": follower.events,
                                  "errors": follower.errors, "last_error": follower.last_error}
        clock = arrival_clock(env)
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
        sink = _run.get("sink")
        if sink is not None:
            meta["records"] = {"path": str(sink.path), "written": sink.written}
        doc = to_json(accounting, meta)
        doc["self_monitor"] = _self_monitor_summaries()
        gpu_lines = gpu_hooks.extend_report(doc, accounting, list(_records), _run["started"], end, path)
        capacity = capacity_section(ledger_doc, _records, _run["started"], duration, server_max_num_seqs(host))
        if capacity is not None:
            doc["capacity"] = capacity
        write_report(path, doc)
        html_path = write_html_report(path, doc, taken=getattr(opts, "html_file", None))  # never over Locust's
        if reason is not None:
            print(f"\nstopstorm: PARTIAL report ({reason}): the figures cover the run until then", flush=True)
        summary = "\n".join([format_summary(accounting), *gpu_lines])
        print(f"\nstopstorm abort accounting (JSON: {path}; HTML: {html_path})\n{summary}\n", flush=True)
        for line in warnings_for(doc["self_monitor"]):
            print(f"stopstorm self-monitor: {line}", flush=True)
    except Exception:
        _log.exception("stopstorm: the abort accounting failed; Locust's own results stand")
    finally:
        _stop_log()
        sink = _run.pop("sink", None)
        if sink is not None:
            sink.close()


# -- self-monitoring (metrics/self_monitor.py): every process watches its own loops and CPU -------------
_monitors: dict[str, Any] = {}  # "self": this process's SelfMonitor; "workers": {key: summary} on a master


@events.init.add_listener
def _check_self_monitor_options(environment: Environment, **_kwargs: Any) -> None:
    try:
        from_options(environment.parsed_options)
    except ValueError as exc:
        _log.error("stopstorm: %s", exc)
        _stop_simulator()
        raise SystemExit(2) from None


@events.test_start.add_listener
def _start_self_monitor(environment: Environment, **_kwargs: Any) -> None:
    if "self" in _monitors:
        return
    monitor: SelfMonitor = from_options(environment.parsed_options).start()
    _monitors["self"] = monitor
    _monitors["key"] = process_key(environment.runner)


@events.request.add_listener
def _check_timing(context: dict[str, Any] | None = None, **_kwargs: Any) -> None:
    monitor = _monitors.get("self")
    if monitor is not None and context and isinstance(context.get("record"), StreamRecord):
        monitor.check(context["record"])


@events.test_stop.add_listener
def _stop_self_monitor(**_kwargs: Any) -> None:
    monitor = _monitors.get("self")
    if monitor is not None:
        monitor.stop()


@events.report_to_master.add_listener
def _send_self_monitor(data: dict[str, Any], **_kwargs: Any) -> None:
    monitor = _monitors.get("self")
    if monitor is not None:  # cumulative: the master keeps the latest per worker
        data["stopstorm_self_monitor"] = {"key": _monitors["key"], "summary": monitor.summary()}


@events.worker_report.add_listener
def _receive_self_monitor(client_id: str, data: dict[str, Any], **_kwargs: Any) -> None:
    sent = data.get("stopstorm_self_monitor")
    if isinstance(sent, dict):
        _monitors.setdefault("workers", {})[str(sent.get("key", f"worker {client_id}"))] = sent.get("summary")


def _self_monitor_summaries() -> dict[str, Any]:
    """Every process's self-monitor summary, keyed by process: this one's and, on a master, its workers'."""
    out: dict[str, Any] = dict(_monitors.get("workers", {}))
    monitor = _monitors.get("self")
    if monitor is not None:
        monitor.stop()
        out[_monitors["key"]] = monitor.summary()
    return out


# Last: the run report above reads the simulator's ledger before this stops it.
events.quit.add_listener(_stop_simulator)
