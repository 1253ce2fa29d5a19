"""Why a run ended early: Ctrl-C (SIGINT) or SIGTERM make Locust shut down the same way a finished run does
(its `quit` event, so the report is still written); these watchers only remember the signal, so the report
can say that it is partial and why.

SIGTERM gets a gevent watcher of its own beside Locust's (libev runs every watcher of a signal); SIGINT's
Python handler is wrapped, and the previous one (KeyboardInterrupt) still runs.
"""

from __future__ import annotations

import contextlib
import signal
import time
from types import FrameType
from typing import Any

import gevent

__all__ = ["install_stop_signals", "stop_reason"]

_state: dict[str, Any] = {}


def _mark(name: str) -> None:
    _state.setdefault("reason", f"{name} received {time.strftime('%H:%M:%S')} UTC: the run was cut short")


def install_stop_signals() -> None:
    """Start remembering SIGTERM and SIGINT (once per process; main thread only, as signals demand)."""
    if _state.get("installed"):
        return
    _state["installed"] = True
    _state["watcher"] = gevent.signal_handler(signal.SIGTERM, _mark, "SIGTERM")
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        _mark("SIGINT (Ctrl-C)")
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread (an embedded Environment): SIGTERM still watched
        signal.signal(signal.SIGINT, on_sigint)


def stop_reason() -> str | None:
    """Why the run ended early, or None when it ended by itself (run time, the web UI's Stop, its users)."""
    return _state.get("reason")
