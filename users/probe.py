"""The stop-semantics probe: the seed's hand experiment, run for every client stack × close mode.

One stream at a time (so nothing else competes for the slot), each stopped after a fixed number of tokens,
each judged by server truth: did the server abort, how long after Stop was the slot freed, and how many
tokens did it generate that nobody read. Run it with `locust -f probe.py --headless -u 1 --ignore-eos --max-tokens 200`;
it walks the matrix once and stops the run by itself, then prints the table and writes the JSON.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Any, NoReturn

import gevent
import orjson
from locust import User, constant, task
from locust.argument_parser import LocustArgumentParser
from locust.exception import StopUser

from metrics.accounting import server_id
from metrics.probe_report import PROBE_SCHEMA_VERSION, ProbeSample, format_table, summarise
from metrics.record import StreamRecord
from metrics.truth import LEDGER_SOURCE, LedgerClient
from metrics.vllm_stream_truth import VLLM_TRUTH_SOURCE, VllmStreamTruth
from users.core import AsyncStreamingUser, arun_stream, run_stream
from users.options import RunSettings, settings_for
from users.policy import CLOSE_MODES, StopPlan
from users.stacks import STACKS, user_class

__all__ = ["StopProbeUser", "add_probe_arguments", "probe_results", "probe_truth_source", "write_probe_results"]

_log = logging.getLogger("stopstorm.probe")
_results: list[tuple[StreamRecord, dict[str, Any] | None]] = []
_truth_source: list[str] = [LEDGER_SOURCE]  # what judged the streams: the simulator ledger, or vLLM log + metrics


def add_probe_arguments(parser: LocustArgumentParser) -> None:
    g = parser.add_argument_group("stopstorm stop-semantics probe", "used by StopProbeUser")
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


def probe_results() -> list[tuple[StreamRecord, dict[str, Any] | None]]:
    return _results


def probe_truth_source() -> str:
    return _truth_source[0]


def write_probe_results(path: str, host: str) -> str:
    """Print the table and write the JSON; returns the table."""
    samples = [ProbeSample.from_pair(record, entry) for record, entry in _results]
    cells = summarise(samples)
    table = format_table(cells)
    doc = {
        "schema_version": PROBE_SCHEMA_VERSION,
        "host": host,
        "truth_source": probe_truth_source(),
        "versions": _library_versions(),
        "cells": [dataclasses.asdict(c) for c in cells],
        "streams": [{"record": r.to_json(), "ledger": e} for r, e in _results],
    }
    with open(path, "wb") as f:
        f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return table


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("requests", "httpx", "openai", "geventhttpclient", "locust", "gevent"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


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
            vllm = self._vllm_truth(settings.host, getattr(opts, "server_log", "") or "")
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
                        entry: dict[str, Any] | None
                        if vllm is not None:
                            entry = vllm.settle(sid, settle)
                            if not entry["log_added"] and not _results:
                                _log.warning("%s does not name %s: is it vLLM's log, written with "
                                             "--enable-log-requests? Aborts cannot be confirmed without it.",
                                             vllm.log.path, sid)
                        else:
                            entry = ledger.wait_freed(sid, settle)
                        _results.append((record, entry))
                        if opts.probe_gap > 0:
                            gevent.sleep(opts.probe_gap)
            finally:
                runner.shutdown()
        if vllm is not None:
            vllm.close()
        ledger.close()
        self._end_run()

    def _vllm_truth(self, host: str, log_path: str) -> VllmStreamTruth:
        """Real vLLM's truth (its log + /metrics), or the end of the run when there is none."""
        if not log_path:
            _log.error("the probe needs server truth: %s has no simulator ledger; for real vLLM give --server-log "
                       "with its log file (served with --enable-log-requests)", host)
            self._end_run()
        truth = VllmStreamTruth(host, log_path)
        if not truth.available():
            _log.error("the probe needs server truth: %s has neither a simulator ledger nor vLLM's /metrics (%s)",
                       host, truth.metrics.last_error)
            truth.close()
            self._end_run()
        truth.start()
        _truth_source[0] = VLLM_TRUTH_SOURCE
        return truth

    def _end_run(self) -> NoReturn:
        """Quit the run from a greenlet of its own: quitting stops every user, this one included, and a
        greenlet killed inside its own quit leaves the run going until its time limit."""
        gevent.spawn(self.environment.runner.quit)
        raise StopUser()


class _StreamRunner:
    """Runs single streams with one stack's transport, outside that stack's Locust user."""

    def __init__(self, cls: type[Any], settings: RunSettings) -> None:
        self.cls = cls
        self.settings = settings
        self.is_async = issubclass(cls, AsyncStreamingUser)
        if self.is_async:
            from users.bridge import get_bridge

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
