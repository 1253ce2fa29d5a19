"""Server truth for one request, from the simulator's ledger (`GET /stopstorm/ledger/<id>`).

Real vLLM has no ledger; its truth (metrics, log) comes through other readers. Every figure built from this
one says its source is the simulator ledger.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import requests

__all__ = ["LedgerClient", "server_max_num_seqs"]


class LedgerClient:
    """Reads ledger entries; None when the server has no ledger (not the simulator) or no such request."""

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

    def entry(self, server_id: str) -> dict[str, Any] | None:
        return self._get_json(f"/stopstorm/ledger/{server_id}")

    def ledger(self) -> dict[str, Any] | None:
        """The whole ledger document (`GET /stopstorm/ledger`); None when it cannot be read."""
        return self._get_json("/stopstorm/ledger")

    def stats(self) -> dict[str, Any] | None:
        """The simulator's engine counters and config (`GET /stopstorm/stats`); None when it cannot be read."""
        return self._get_json("/stopstorm/stats")

    def wait_freed(self, server_id: str, timeout: float, poll: float = 0.02) -> dict[str, Any] | None:
        """The entry once the request has left the engine (finished or aborted), or as it is at `timeout`."""
        deadline = time.monotonic() + timeout
        entry = self.entry(server_id)
        while (entry is None or entry.get("freed") is None) and time.monotonic() < deadline:
            time.sleep(poll)
            entry = self.entry(server_id)
        return entry

    def close(self) -> None:
        self.session.close()

def server_max_num_seqs(host: str) -> int | None:
    """The simulator's `max_num_seqs` from `GET /stopstorm/stats`; None for a server without it (real vLLM)."""
    if not host:
        return None
    client = LedgerClient(host)
    try:
        stats = client.stats()
    finally:
        client.close()
    value = ((stats or {}).get("config") or {}).get("max_num_seqs")
    return int(value) if isinstance(value, int) else None
