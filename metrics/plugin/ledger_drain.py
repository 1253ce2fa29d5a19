"""The simulator's ledger read as the run goes, not once at its end: settled entries are fetched every few
seconds (`GET /stopstorm/ledger/settled?after=N`) and kept on disk, one JSON line each, until the report reads
them back.

Why: a capacity test runs for hours, and a ledger read whole at the end means every request's entry held twice
(the simulator's, then ours) for the whole run. Read in settle order, each entry is fetched once, when nothing
about it can change any more; asking after N tells the simulator we hold 1..N, and the embedded simulator
(`--forget-read-ledger`) then drops them, so both processes stay flat. A simulator the user started keeps its
entries (other readers may want them); the drain still reads it so, which costs nothing extra. A server with
no such endpoint (real vLLM, an older simulator) is read as before, whole, at the end (metrics/plugin/hooks.py).

The report's snapshot is the drained entries plus those still in flight at the end, in arrival order, so it is
the same ledger a whole read would have given: same entries, same marks.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gevent

from stopstorm.metrics.plugin.spool import JsonlSpool
from stopstorm.metrics.truth.ledger import LedgerClient, LedgerSnapshot, SettledPage
from stopstorm.simulator.ledger import LedgerEntry

__all__ = ["LedgerDrain"]

_log = logging.getLogger("stopstorm")

PAGE = 5000  # entries a read asks for at most; a larger backlog is read in several pages at once


class LedgerDrain:
    """One run's reader of a simulator's settled entries, from `after` (the last number an earlier run of this
    process read: what it acknowledged is gone from a forgetting simulator)."""

    def __init__(self, host: str, after: int = 0, interval_s: float = 2.0, timeout_s: float = 5.0) -> None:
        self.host = host
        self.after = after
        self.interval_s = interval_s
        self.client = LedgerClient(host, timeout=timeout_s)
        self.spool: JsonlSpool[LedgerEntry] = JsonlSpool(  # raises OSError when the temp folder takes no file
            "the ledger spool", LedgerEntry.to_json, LedgerEntry.from_json, temp_prefix="ledger")
        self._lock = threading.Lock()  # the loop's greenlet and the report's final read take turns
        self._loop: gevent.Greenlet | None = None
        self.last: SettledPage | None = None  # the latest page read (its `now`, `unsettled`, clock offset)
        self.failures = 0
        self.last_error = ""

    @classmethod
    def open(cls, host: str, after: int = 0, interval_s: float = 2.0) -> LedgerDrain | None:
        """A drain reading `host`'s ledger, its first page read; None for a server without the endpoint (real
        vLLM, an older simulator) or one that does not answer now: its ledger is read whole at the end."""
        probe = LedgerClient(host, timeout=2.0)
        try:
            first = probe.settled(after, limit=1)
        finally:
            probe.close()
        if first is None:
            return None
        if after > first.settled:  # not where an earlier run left off: another server, or this one restarted
            _log.info("stopstorm: the ledger at %s has %d settled entries, fewer than the %d read before: a new "
                      "server; read from its start", host, first.settled, after)
            after = 0
        try:
            drain = cls(host, after, interval_s)
        except OSError as exc:
            _log.error("stopstorm: no ledger spool in %s (%s); the ledger is read whole at the end",
                       tempfile.gettempdir(), exc.strerror or exc)
            return None
        drain.poll()
        return drain

    # -- reading ------------------------------------------------------------------------------------------

    def poll(self, in_flight: bool = False) -> SettledPage | None:
        """Read every entry settled since the last read (page after page); with `in_flight` the last page also
        carries the entries still in flight. The latest page, or None when the server did not answer."""
        with self._lock:
            while True:
                page = self.client.settled(self.after, in_flight=in_flight, limit=PAGE)
                if page is None:
                    self.failures += 1
                    self.last_error = f"GET {self.host}/stopstorm/ledger/settled failed"
                    return None
                for entry in page.entries:
                    self.spool.append(entry)
                self.after = page.next
                self.last = page
                if len(page.entries) < PAGE:
                    return page

    def __len__(self) -> int:
        return len(self.spool)

    @property
    def path(self) -> Path | None:
        """The spool's file (None once discarded)."""
        return self.spool.path

    def entries(self) -> Iterator[LedgerEntry]:
        """Every entry drained so far, in settle order."""
        return iter(self.spool)

    def snapshot(self, page: SettledPage | None = None) -> LedgerSnapshot | None:
        """The ledger as a whole read would give it: every drained entry and those in flight in `page` (a read
        with `in_flight`; a fresh one when not given), in arrival order. None when the server cannot be read."""
        if page is None or page.in_flight is None:
            page = self.poll(in_flight=True)
        if page is None:
            return None
        entries = [*self.entries(), *(page.in_flight or ())]
        entries.sort(key=lambda e: e.arrival)  # a whole read's order (the simulator's entries arrive in order)
        return LedgerSnapshot(page.now, tuple(entries), page.schema_version, page.epoch_offset)

    def settled(self, timeout_s: float, poll_s: float = 0.02) -> LedgerSnapshot | None:
        """The ledger once every request has left the engine and its response is done (users killed at a run's
        end are closing theirs), or as it is at `timeout_s`."""
        self.stop()
        deadline = time.monotonic() + timeout_s
        page = self.poll(in_flight=True)
        while page is not None and page.unsettled and time.monotonic() < deadline:
            time.sleep(poll_s)
            page = self.poll(in_flight=True)
        return self.snapshot(page) if page is not None else None

    # -- the loop -----------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop is None:
            self._loop = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            gevent.sleep(self.interval_s)
            try:
                self.poll()
            except Exception as exc:  # a reader's bug must not end the run; said once, retried next time
                if not self.failures:
                    _log.warning("stopstorm: reading the simulator's ledger failed: %s", exc)
                self.failures += 1
                self.last_error = str(exc)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.kill(block=False)

    def discard(self) -> None:
        """The report has the entries: the loop stopped, the spool closed and removed."""
        self.stop()
        self.spool.discard()
        self.client.close()
