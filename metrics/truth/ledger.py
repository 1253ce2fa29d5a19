"""Server truth from the simulator's ledger (`GET /stopstorm/ledger`, `/stopstorm/ledger/<id>`), typed.

Real vLLM has no ledger; its truth (metrics, log) comes through other readers. The entries arrive as the
simulator's own `LedgerEntry` (stopstorm/simulator/ledger.py) and stay typed through the analysis to the
report. Every figure built from them says its source is the simulator ledger.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import requests

from stopstorm.simulator.ledger import LedgerEntry

__all__ = ["LedgerClient", "LedgerSnapshot", "SettledPage", "max_num_seqs_of", "server_max_num_seqs"]


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    """The whole ledger as it was at `now` (the simulator's monotonic clock, the same as ours on one host)."""

    now: float
    entries: tuple[LedgerEntry, ...]  # in arrival order
    schema_version: int | None = None
    epoch_offset: float | None = None

    @property
    def by_id(self) -> dict[str, LedgerEntry]:
        return {e.request_id: e for e in self.entries}

    @property
    def served(self) -> list[LedgerEntry]:
        """The requests the server served (status 200); the ones it refused never took a slot."""
        return [e for e in self.entries if e.status_code == 200]

    @property
    def settled(self) -> bool:
        """Every request has left the engine."""
        return all(e.freed is not None for e in self.entries)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LedgerSnapshot:
        entries = tuple(LedgerEntry.from_json(e) for e in doc.get("requests", []))
        now = doc.get("now")
        if now is None:  # a hand-made document: its latest mark
            marks = [m for e in entries for m in (e.arrival, e.scheduled, e.first_token, e.last_token,
                                                  e.disconnect_seen, e.freed) if m is not None]
            now = max(marks) if marks else 0.0
        return cls(float(now), entries, doc.get("schema_version"), doc.get("epoch_offset"))


@dataclass(frozen=True, slots=True)
class SettledPage:
    """One read of `GET /stopstorm/ledger/settled`: entries in the order they settled, `next` the number to
    ask after next time; `unsettled` how many are still in flight (`in_flight` holds them when asked for)."""

    now: float
    entries: tuple[LedgerEntry, ...]
    next: int
    settled: int  # the number of the latest entry to settle on the server (a cursor beyond it is not its)
    unsettled: int
    in_flight: tuple[LedgerEntry, ...] | None
    epoch_offset: float | None
    schema_version: int | None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SettledPage:
        flying = doc.get("in_flight")
        return cls(float(doc["now"]), tuple(LedgerEntry.from_json(e) for e in doc.get("requests", [])),
                   int(doc["next"]), int(doc.get("settled") or 0), int(doc.get("unsettled") or 0),
                   tuple(LedgerEntry.from_json(e) for e in flying) if flying is not None else None,
                   doc.get("epoch_offset"), doc.get("schema_version"))


class LedgerClient:
    """Reads the ledger; None when the server has no ledger (not the simulator) or no such request."""

    def __init__(self, host: str, timeout: float = 5.0) -> None:
        self.host = host.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def available(self) -> bool:
        return self._get_json("/stopstorm/stats") is not None

    def _get_json(self, path: str) -> dict[str, Any] | None:
        try:
            resp = self.session.get(f"{self.host}{path}", timeout=self.timeout)
        except requests.RequestException:
            return None
        if resp.status_code != 200:
            return None
        result: dict[str, Any] = orjson.loads(resp.content)
        return result

    def entry(self, server_id: str) -> LedgerEntry | None:
        doc = self._get_json(f"/stopstorm/ledger/{server_id}")
        return None if doc is None else LedgerEntry.from_json(doc)

    def ledger(self) -> LedgerSnapshot | None:
        """The whole ledger (`GET /stopstorm/ledger`); None when it cannot be read."""
        doc = self._get_json("/stopstorm/ledger")
        return None if doc is None else LedgerSnapshot.from_json(doc)

    def settled(self, after: int, *, in_flight: bool = False, limit: int = 5000) -> SettledPage | None:
        """The entries that settled after number `after` (`GET /stopstorm/ledger/settled`; asking acknowledges
        1..after, which a simulator under --forget-read-ledger then drops); None when it cannot be read (a
        server without it: real vLLM, an older simulator)."""
        flight = "&in_flight=1" if in_flight else ""
        doc = self._get_json(f"/stopstorm/ledger/settled?after={int(after)}&limit={int(limit)}{flight}")
        return None if doc is None else SettledPage.from_json(doc)

    def stats(self) -> dict[str, Any] | None:
        """The simulator's engine counters and config (`GET /stopstorm/stats`); None when it cannot be read."""
        return self._get_json("/stopstorm/stats")


    def wait_freed(self, server_id: str, timeout: float, poll: float = 0.02) -> LedgerEntry | None:
        """The entry once the request has left the engine (finished or aborted), or as it is at `timeout`."""
        return _poll(lambda: self.entry(server_id), lambda e: e is not None and e.freed is not None, timeout, poll)

    def wait_settled(self, timeout: float, poll: float = 0.02) -> LedgerSnapshot | None:
        """The ledger once every request has left the engine (users killed at a run's end are closing theirs),
        or as it is at `timeout`."""
        return _poll(self.ledger, lambda s: s is None or s.settled, timeout, poll)

    def close(self) -> None:
        self.session.close()


def _poll(read: Callable[[], Any], done: Callable[[Any], bool], timeout: float, poll: float) -> Any:
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(poll)
        value = read()
    return value


def server_max_num_seqs(host: str) -> int | None:
    """The simulator's `max_num_seqs` from `GET /stopstorm/stats`; None for a server without it (real vLLM)."""
    if not host:
        return None
    client = LedgerClient(host)
    try:
        return max_num_seqs_of(client.stats())
    finally:
        client.close()


def max_num_seqs_of(stats: dict[str, Any] | None) -> int | None:
    """`max_num_seqs` from the simulator's stats (`LedgerClient.stats`); None without it."""
    value = ((stats or {}).get("config") or {}).get("max_num_seqs")
    return int(value) if isinstance(value, int) else None
