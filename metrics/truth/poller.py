"""A reading taken every `interval` seconds in a gevent greenlet, until stopped: the /metrics scraper and the GPU
samplers are both this, so starting, pacing and stopping live here once.

Pacing subtracts the reading's own time, so a slow reading does not stretch the interval; `halt` waits half its
timeout for a reading in flight and then kills it, so a hung server or driver cannot hold up the run's end.
"""

from __future__ import annotations

import time

import gevent
import gevent.event

__all__ = ["Poller"]


class Poller:
    """Subclasses set `interval` and implement `read_once()`, which must not raise."""

    interval: float
    what = "poller"  # for the error when started twice

    def __init__(self) -> None:
        self._stop = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None

    def read_once(self) -> object:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        return self._greenlet is not None and not self._greenlet.dead

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"{self.what} already running")
        self._stop.clear()
        self._greenlet = gevent.spawn(self._loop)

    def halt(self, timeout: float = 1.0) -> bool:
        """Stop the readings; True when the greenlet was running. A reading in flight gets half of `timeout`."""
        self._stop.set()
        g, self._greenlet = self._greenlet, None
        if g is None:
            return False
        g.join(timeout / 2)
        if not g.dead:
            g.kill(block=True, timeout=timeout / 2)
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            self.read_once()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))
