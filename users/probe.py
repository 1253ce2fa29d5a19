"""The stop-semantics probe: the seed's hand experiment, run for every client stack × close mode.

One stream at a time (so nothing else competes for the slot), each stopped after a fixed number of tokens,
each judged by server truth: did the server abort, how long after Stop was the slot freed, and how many
tokens did it generate that nobody read. Then, per stack, the early-stop rows (`--probe-early`: a close 10 ms
after the send and at the first token, by default): how many of those closes the server never acted on (the
request ran on to its end) and how many never reached the engine. Run it with `locust -f probe.py --headless
-u 1 --ignore-eos --max-tokens 200`; it walks the matrix once, a progress line per cell, and stops the run by
itself; then it prints the table and its verdict and writes its own files (metrics/plugin/probe.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn

import gevent
from locust import User, constant, task
from locust.argument_parser import LocustArgumentParser
from locust.exception import StopUser

from stopstorm.metrics.analysis.accounting import server_id
from stopstorm.metrics.analysis.probe import ProbeSample, summarise
from stopstorm.metrics.plugin import options
from stopstorm.metrics.plugin.options import Number, Option, Parsed, WritablePath, seconds
from stopstorm.metrics.plugin.probe import DEFAULT_PROBE_REPORT, PROBE
from stopstorm.metrics.plugin.state import RUN
from stopstorm.metrics.plugin.truth_target import StreamTruthReader, stream_truth, truth_host, truth_source
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.report.probe_table import format_progress
from stopstorm.metrics.truth.ledger import LedgerClient
from stopstorm.metrics.truth.vllm_log import LineFollower
from stopstorm.users.core import report
from stopstorm.users.options import MAX_TOKENS, settings_for
from stopstorm.users.policy import CLOSE_MODES, StopPlan
from stopstorm.users.single import SingleStreams
from stopstorm.users.stacks import STACKS

__all__ = ["StopProbeUser", "add_probe_arguments", "parse_early"]

EARLY_MODE = "close"  # the early-stop rows close at once: the question is whether the server acts on it
# A request closed before it reached the server leaves no ledger entry: how long to wait for one to appear.
_ENTRY_WAIT_S = 1.0

_log = logging.getLogger("stopstorm.probe")


def _names(flag: str, valid: tuple[str, ...] | list[str], what: str) -> Callable[[str], list[str]]:
    """The parser of a comma-separated list of names, each one of `valid`."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in (text or "").split(",") if n.strip()]
        if not names:
            raise ValueError(f"{flag}: name at least one {what}; choose from {', '.join(valid)}")
        for name in names:
            if name not in valid:
                raise ValueError(f"{flag}: unknown {what} {name!r}; choose from {', '.join(valid)}")
        return names

    return parse


parse_stacks = _names("--probe-stacks", list(STACKS), "client stack")
parse_modes = _names("--probe-modes", CLOSE_MODES, "close mode")
_EARLY_FORMS = "seconds:S (a close S seconds after the send), first-token, tokens:N, comma-separated, or none"


def parse_early(text: str) -> list[StopPlan]:
    """`--probe-early`: the early-stop rows' stop points (`none`: no early rows)."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        raise ValueError(f"--probe-early: give {_EARLY_FORMS}")
    if names == ["none"]:
        return []
    plans = []
    for name in names:
        kind, _, arg = name.partition(":")
        try:
            if name == "first-token":
                plans.append(StopPlan(first_token=True))
            elif kind == "seconds" and arg and 0 <= float(arg) <= 3600:
                plans.append(StopPlan(seconds=float(arg)))
            elif kind == "tokens" and arg and 1 <= int(arg) <= MAX_TOKENS:
                plans.append(StopPlan(tokens=int(arg)))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"--probe-early: {name!r} is not a stop point; give {_EARLY_FORMS}") from None
    return plans


TABLE = options.OptionTable("stopstorm stop-semantics probe", description="used by StopProbeUser", options=(
    Option("--probe-stacks", f"client stacks to probe, comma-separated (default all: {','.join(STACKS)})",
           ",".join(STACKS), Parsed(parse_stacks, "client stack names, comma-separated")),
    Option("--probe-modes", "close modes to probe (default close,drop,hold)", ",".join(CLOSE_MODES[:3]),
           Parsed(parse_modes, "close modes, comma-separated")),
    Option("--probe-repeats", "streams per cell (default 3)", 3, Number(low=1, high=1_000_000, integer=True), int),
    Option("--probe-stop-tokens", "Stop after this many tokens (default 20)", 20,
           Number(low=1, high=MAX_TOKENS, integer=True), int),
    Option("--probe-gap", "seconds to wait after each stream's slot is freed, so a sampled GPU can go idle between "
           "streams and each Stop's drop is measured (e.g. 2 with a GPU; default 0)", 0.0, seconds(), float),
    Option("--probe-early", "stop points of the early-stop rows, run per stack in close mode: does the server act "
           f"on a close this early? ({_EARLY_FORMS}; default seconds:0.01,first-token)", "seconds:0.01,first-token",
           Parsed(parse_early, _EARLY_FORMS)),
    Option("--probe-early-repeats", "streams per early-stop row (default 5)", 5,
           Number(low=1, high=1_000_000, integer=True), int),
    Option("--probe-json", "where to write the probe's results (default stopstorm-probe.json)",
           "stopstorm-probe.json", WritablePath(), master_only=True),
    Option("--probe-report", "where to write the probe's run report (JSON; the HTML and GPU files go beside it; "
           f"default {DEFAULT_PROBE_REPORT}); a probe run writes no --stopstorm-report", DEFAULT_PROBE_REPORT,
           WritablePath(), master_only=True),
))


def add_probe_arguments(parser: LocustArgumentParser) -> None:
    TABLE.add_arguments(parser)


options.register(TABLE, rank=20)


class StopProbeUser(User):
    """Walks stack × close mode, one stream at a time, then ends the run."""

    wait_time = constant(0)
    fixed_count = 1
    # It reads each stream's ledger entry as it goes: the run's ledger is read whole at the end, not drained
    # (a forgetting simulator would drop entries it still waits for: metrics/plugin/ledger_drain.py).
    reads_ledger_entries = True

    @task
    def walk_matrix(self) -> None:
        opts = self.environment.parsed_options
        PROBE.active = True  # this run's files are the probe's (metrics/plugin/probe.py)
        settings = settings_for(self.environment, self.host or "")
        truth = truth_host(self.environment)  # the server's own, behind any proxy (--truth-url)
        ledger = LedgerClient(truth)
        vllm: StreamTruthReader | None = None
        if not ledger.available():
            ledger.close()
            vllm = self._vllm_truth(truth, opts)
            PROBE.log = vllm.log
        stacks, modes = parse_stacks(opts.probe_stacks), parse_modes(opts.probe_modes)  # checked at init
        early = parse_early(opts.probe_early)
        rows = [(mode, StopPlan(tokens=opts.probe_stop_tokens), opts.probe_repeats, False) for mode in modes]
        rows += [(EARLY_MODE, plan, opts.probe_early_repeats, True) for plan in early]
        settle = settings.hold_seconds + 10.0
        total, done = len(stacks) * len(rows), 0
        streams = SingleStreams(insecure=settings.insecure)  # the users' own path, with the run's settings
        for stack in stacks:
            try:
                for mode, plan, repeats, is_early in rows:
                    cell: list[tuple[StreamRecord, dict[str, Any] | None]] = []
                    for _ in range(repeats):
                        if vllm is not None:
                            vllm.before_stream()
                        record = streams.run(stack, settings, mode, plan)
                        report(self.environment, record)  # Locust's request event: its stats, the records
                        sid = server_id(record)
                        entry: dict[str, Any] | None  # the server's truth about the stream, as the JSON keeps it
                        if vllm is not None:
                            entry = vllm.settle(sid, settle)
                            if not entry["log_added"] and not PROBE.streams and not is_early:
                                _log.warning("%s does not name %s: is it vLLM's log, written with "
                                             "--enable-log-requests? Aborts cannot be confirmed without it.",
                                             _log_name(opts), sid)
                        else:
                            entry = _ledger_truth(ledger, sid, settle)
                        PROBE.add(record, entry, early=is_early)
                        cell.append((record, entry))
                        if opts.probe_gap > 0:
                            gevent.sleep(opts.probe_gap)
                    done += 1
                    for summary in summarise(ProbeSample.from_pair(r, e) for r, e in cell):
                        _log.info(format_progress(summary, done, total))
            finally:
                streams.shutdown(stack)
        if vllm is not None:
            vllm.close()
        ledger.close()
        self._end_run()

    def _vllm_truth(self, host: str, opts: Any) -> StreamTruthReader:
        """Real vLLM's truth (its log + /metrics), or the end of the run when there is none. A log read through
        a command or stdin is the plugin's follower (a pipe has one reader); a file is followed here."""
        log_path = getattr(opts, "server_log", "") or ""
        log: str | LineFollower = log_path
        if (getattr(opts, "server_log_cmd", "") or "").strip() or log_path == "-":
            if RUN.log is None:
                _log.error("the probe needs server truth: the server log (%s) is not being read", _log_name(opts))
                self._end_run()
            log = RUN.log
        if not log:
            _log.error("the probe needs server truth: %s has no simulator ledger; for real vLLM give --server-log "
                       "with its log file, or --server-log-cmd (served with --enable-log-requests)", host)
            self._end_run()
        truth = stream_truth(self.environment, log)
        if not truth.available():
            _log.error("the probe needs server truth: %s has neither a simulator ledger nor vLLM's /metrics (%s)",
                       host, truth.metrics.last_error)
            truth.close()
            self._end_run()
        truth.start()
        PROBE.truth_source = truth_source(truth)
        return truth

    def _end_run(self) -> NoReturn:
        """Quit the run from a greenlet of its own: quitting stops every user, this one included, and a
        greenlet killed inside its own quit leaves the run going until its time limit."""
        gevent.spawn(self.environment.runner.quit)
        raise StopUser()


def _ledger_truth(ledger: LedgerClient, sid: str, settle: float) -> dict[str, Any] | None:
    """The ledger's entry once the request has left the engine; None when the server never saw it (a close
    before the request arrived), which is known once no entry has appeared for `_ENTRY_WAIT_S`."""
    found = ledger.wait_freed(sid, min(settle, _ENTRY_WAIT_S))
    if found is not None and found.freed is None:
        found = ledger.wait_freed(sid, settle)
    return found.to_json() if found is not None else None


def _log_name(opts: Any) -> str:
    return (getattr(opts, "server_log_cmd", "") or "").strip() or getattr(opts, "server_log", "") or ""

