"""Signals that end a run: the first ends it cleanly with its report, a second one changes nothing, a third
forces the exit and says what was lost.

Locust shuts down on SIGTERM (its own gevent watcher calls its `shutdown`, which stops the run: test_stop, where
the run's report is written) and on Ctrl-C through Python's KeyboardInterrupt, which lands wherever the main
thread happens to be: inside the report's writing, a greenlet's traceback, or a second shutdown racing the first.
So stopstorm takes both signals over:

- SIGINT never raises KeyboardInterrupt: the first one sends this process a SIGTERM, so Ctrl-C ends the run by
  the same path as SIGTERM (one clean shutdown, no traceback); the report says "SIGINT (Ctrl-C)".
- The first SIGTERM (ours or anyone's) runs Locust's shutdown once; from then on both signals go to a plain
  Python handler that never starts a second one: the second signal says the report is being finished, the third
  calls the `on_force` hooks (the embedded simulator killed by PID) and leaves at once with `EXIT_CUT_SHORT`,
  saying what it lost (`lost()`).

Python runs a signal handler in the main thread between two bytecodes, whatever greenlet holds it, so the
handlers here only note the signal and write with `os.write` (no lock, no logging, no greenlet switch).
The hooks (metrics/plugin/hooks.py) read `first_signal()` to mark the cut run partial and set its exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

import gevent

__all__ = ["EXIT_CUT_SHORT", "first_signal", "install_stop_signals", "on_force", "signals_received", "stop_reason"]

EXIT_CUT_SHORT = 4
"""The exit status of a run a signal cut short (SIGINT/SIGTERM before its end), whatever its figures; Locust's
own are 0 (passed), 1 (a request failed) and 2 (an error); 3 is a broken --fail-on threshold
(metrics/analysis/thresholds.py)."""

_NAMES: dict[int, str] = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


@dataclass
class _Signals:
    installed: bool = False
    received: list[tuple[str, float, float]] = field(default_factory=list)  # (name, monotonic, wall)
    self_sent: int = 0  # SIGTERMs this process sent itself for a Ctrl-C: not new signals
    taken_over: bool = False  # SIGTERM now goes to the Python handler (Locust's shutdown has begun)
    watcher: object | None = None
    force: list[Callable[[], None]] = field(default_factory=list)
    lost: Callable[[], str] | None = None


_STATE = _Signals()


def _say(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"\nstopstorm: {text}\n".encode())


def _note(signum: int) -> int:
    """Remember the signal; how many have come."""
    _STATE.received.append((_NAMES.get(signum, f"signal {signum}"), time.monotonic(), time.time()))
    return len(_STATE.received)


def _again(count: int) -> None:
    """A signal after the first: the second says what is going on, the third forces the exit."""
    if count == 2:
        _say("already shutting down: the run's report is being finished (a third SIGINT/SIGTERM exits at once, "
             "without what is not written yet)")
        return
    lost = "nothing"
    if _STATE.lost is not None:
        with contextlib.suppress(Exception):
            lost = _STATE.lost()
    for hook in _STATE.force:
        with contextlib.suppress(Exception):
            hook()
    _say(f"third signal: exiting now (exit status {EXIT_CUT_SHORT}); lost: {lost}")
    os._exit(EXIT_CUT_SHORT)


def _python_handler(signum: int, _frame: FrameType | None) -> None:
    count = _note(signum)
    if count == 1 and signum == signal.SIGINT and not _STATE.taken_over:
        # The first Ctrl-C: Locust's SIGTERM shutdown, the one clean path (its watcher runs at the loop's next turn).
        _STATE.self_sent += 1
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _again(count)


def _first_sigterm() -> None:
    """Beside Locust's own SIGTERM watcher (libev runs both): Locust's shutdown has begun; from now on SIGTERM
    goes to the Python handler, so Locust's watcher never starts a second one."""
    count = 0
    if _STATE.self_sent:
        _STATE.self_sent -= 1  # the Ctrl-C's, already noted (and any later one answered by the Python handler)
    else:
        count = _note(signal.SIGTERM)
    if not _STATE.taken_over:
        _STATE.taken_over = True
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, _python_handler)
    if count > 1:  # a SIGTERM after a Ctrl-C whose own SIGTERM had not been handled yet
        _again(count)


def install_stop_signals() -> None:
    """Take over SIGINT and SIGTERM (once per process; main thread only, as signals demand)."""
    if _STATE.installed:
        return
    _STATE.installed = True
    _STATE.watcher = gevent.signal_handler(signal.SIGTERM, _first_sigterm)
    with contextlib.suppress(ValueError):  # not the main thread (an embedded Environment): SIGTERM still watched
        signal.signal(signal.SIGINT, _python_handler)


def on_force(hook: Callable[[], None] | None = None, lost: Callable[[], str] | None = None) -> None:
    """`hook` runs before a forced exit (kill what would be left behind); `lost` says, in words, what the exit
    loses (the latest call's)."""
    if hook is not None and hook not in _STATE.force:
        _STATE.force.append(hook)
    if lost is not None:
        _STATE.lost = lost


def first_signal() -> tuple[str, float, float] | None:
    """The first SIGINT/SIGTERM: (name, monotonic time, wall time), or None."""
    return _STATE.received[0] if _STATE.received else None


def signals_received() -> int:
    return len(_STATE.received)


def stop_reason(before: float | None = None) -> str | None:
    """Why the run was cut short: the first signal, if it came before `before` (monotonic: the moment the run's
    end began by itself) or at any time when `before` is None; else None (it ended by -t, Stop or its users)."""
    first = first_signal()
    if first is None or (before is not None and first[1] > before):
        return None
    name, _, wall = first
    return f"{name} received {time.strftime('%H:%M:%S', time.gmtime(wall))} UTC: the run was cut short"
