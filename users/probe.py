"""The stop-semantics probe: the seed's hand experiment, run for every client stack × close mode.

One stream at a time (so nothing else competes for the slot), each stopped after a fixed number of tokens,
each judged by server truth: did the server abort, how long after Stop was the slot freed, and how many
tokens did it generate that nobody read. Run it with `locust -f probe.py --headless -u 1 --ignore-eos --max-tokens 200`;
it walks the matrix once and stops the run by itself, then prints the table and writes the JSON.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, NoReturn

import gevent
from locust import User, constant, task
from locust.argument_parser import LocustArgumentParser
from locust.exception import StopUser

from stopstorm.metrics.analysis.accounting import server_id
from stopstorm.metrics.plugin import options
from stopstorm.metrics.plugin.probe import PROBE
from stopstorm.metrics.plugin.state import RUN
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.ledger import LedgerClient
from stopstorm.metrics.truth.vllm_log import LineFollower
from stopstorm.metrics.truth.vllm_stream import VLLM_TRUTH_SOURCE, VllmStreamTruth
from stopstorm.users.core import AsyncStreamingUser, arun_stream, run_stream
from stopstorm.users.options import RunSettings, settings_for
from stopstorm.users.policy import CLOSE_MODES, StopPlan
from stopstorm.users.stacks import STACKS, user_class

__all__ = ["StopProbeUser", "add_probe_arguments"]

_log = logging.getLogger("stopstorm.probe")


def add_probe_arguments(parser: LocustArgumentParser) -> None:
    g = options.argument_group(parser, "stopstorm stop-semantics probe", "used by StopProbeUser")
    g.add_argument("--probe-stacks", default=",".join(STACKS), env_var="STOPSTORM_PROBE_STACKS",
                   help=f"client stacks to probe, comma-separated (default all: {','.join(STACKS)})")
    g.add_argument("--probe-modes", default=",".join(CLOSE_MODES[:3]), env_var="STOPSTORM_PROBE_MODES",
                   help="close modes to probe (default close,drop,hold)")
    g.add_argument("--probe-repeats", type=int, default=3, env_var="STOPSTORM_PROBE_REPEATS",
                   help="streams per cell (default 3)")
    g.add_argument("--probe-stop-tokens", type=int, default=20, env_var="STOPSTORM_PROBE_STOP_TOKENS",
                   help="Stop after this many tokens (default 20)")
    g.add_argument("--probe-gap", type=float, default=0.0, env_var="STOPSTORM_PROBE_GAP",
                   help="seconds to wait after each stream's slot is freed, so a sampled GPU can go idle between "
                   "streams and each Stop's drop is measured (e.g. 2 with a GPU; default 0)")
    g.add_argument("--probe-json", default="stopstorm-probe.json", env_var="STOPSTORM_PROBE_JSON",
                   help="where to write the probe's results (default stopstorm-probe.json)")


options.register(add_probe_arguments, rank=20)


class StopProbeUser(User):
    """Walks stack × close mode, one stream at a time, then ends the run."""

    wait_time = constant(0)
    fixed_count = 1

    @task
    def walk_matrix(self) -> None:
        opts = self.environment.parsed_options
        settings = settings_for(self.environment, self.host or "")
        ledger = LedgerClient(settings.host)
        vllm: VllmStreamTruth | None = None
        if not ledger.available():
            ledger.close()
            vllm = self._vllm_truth(settings.host, opts)
        stacks = [s.strip() for s in opts.probe_stacks.split(",") if s.strip()]
        modes = [m.strip() for m in opts.probe_modes.split(",") if m.strip()]
        for mode in modes:
            if mode not in CLOSE_MODES:
                raise ValueError(f"--probe-modes: unknown close mode {mode!r}; choose from {', '.join(CLOSE_MODES)}")
        plan = StopPlan(tokens=opts.probe_stop_tokens)
        settle = settings.hold_seconds + 10.0
        for stack in stacks:
            cls = user_class(stack)
            runner = _StreamRunner(cls, settings)
            try:
                for mode in modes:
                    for _ in range(opts.probe_repeats):
                        if vllm is not None:
                            vllm.before_stream()
                        record = runner.run(mode, plan)
                        sid = server_id(record)
                        entry: dict[str, Any] | None  # the server's truth about the stream, as the JSON keeps it
                        if vllm is not None:
                            entry = vllm.settle(sid, settle)
                            if not entry["log_added"] and not PROBE.streams:
                                _log.warning("%s does not name %s: is it vLLM's log, written with "
                                             "--enable-log-requests? Aborts cannot be confirmed without it.",
                                             _log_name(opts), sid)
                        else:
                            found = ledger.wait_freed(sid, settle)
                            entry = found.to_json() if found is not None else None
                        PROBE.add(record, entry)
                        if opts.probe_gap > 0:
                            gevent.sleep(opts.probe_gap)
            finally:
                runner.shutdown()
        if vllm is not None:
            vllm.close()
        ledger.close()
        self._end_run()

    def _vllm_truth(self, host: str, opts: Any) -> VllmStreamTruth:
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
        truth = VllmStreamTruth(host, log)
        if not truth.available():
            _log.error("the probe needs server truth: %s has neither a simulator ledger nor vLLM's /metrics (%s)",
                       host, truth.metrics.last_error)
            truth.close()
            self._end_run()
        truth.start()
        PROBE.truth_source = VLLM_TRUTH_SOURCE
        return truth

    def _end_run(self) -> NoReturn:
        """Quit the run from a greenlet of its own: quitting stops every user, this one included, and a
        greenlet killed inside its own quit leaves the run going until its time limit."""
        gevent.spawn(self.environment.runner.quit)
        raise StopUser()


def _log_name(opts: Any) -> str:
    return (getattr(opts, "server_log_cmd", "") or "").strip() or getattr(opts, "server_log", "") or ""


class _StreamRunner:
    """Runs single streams with one stack's transport, outside that stack's Locust user."""

    def __init__(self, cls: type[Any], settings: RunSettings) -> None:
        self.cls = cls
        self.settings = settings
        self.is_async = issubclass(cls, AsyncStreamingUser)
        if self.is_async:
            from stopstorm.users.bridge import get_bridge

            self.bridge = get_bridge()

            async def create() -> Any:
                return cls.transport_class()

            self.transport = self.bridge.run(create)
        else:
            self.transport = cls.transport_class()

    def run(self, mode: str, plan: StopPlan) -> StreamRecord:
        request = self.settings.requests.build(random.Random())
        record = StreamRecord(stack=self.cls.stack, close_mode=mode, endpoint=request.endpoint,
                              request_id=request.request_id, stop_plan=str(plan), wall_start=time.time(),
                              sent=time.monotonic())
        if self.is_async:
            self.bridge.run(lambda: arun_stream(self.transport, self.settings, request, record, plan))
        else:
            run_stream(self.transport, self.settings, request, record, plan)
        return record

    def shutdown(self) -> None:
        if self.is_async:
            self.bridge.run(self.transport.shutdown, timeout=10)
        else:
            self.transport.shutdown()
