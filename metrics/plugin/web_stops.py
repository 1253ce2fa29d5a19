"""A "Stops" tab in Locust's web UI: the latest stopped streams joined live with the server's ledger.

Locust's React UI takes extra tabs from `web_ui.template_args["extendedTabs"]` / `["extendedTables"]` and their
rows from an `extended_stats` list in the `/stats/requests` answer it polls every couple of seconds; this adds
both, the documented way (Locust's examples/extend_web_ui). Each poll joins the latest stopped streams' records
with the simulator's ledger (fetched at most every `refresh_s`), so a person watches each Stop's truth as the
run goes: tokens read, generated, wasted, Stop → slot freed, and whether it is still a zombie. Against a server
without a ledger the tab shows the client's side only and says so in its truth column.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from stopstorm.metrics.analysis.accounting import ZOMBIE_GRACE_S, ledger_by_id, server_id, wasted_tokens
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.ledger import LedgerClient

__all__ = ["STOPS_KEY", "install_stops_tab", "stops_rows"]

STOPS_KEY = "stops"
_ROWS = 50
_STRUCTURE = [
    {"key": "stack", "title": "Stack"}, {"key": "mode", "title": "Close mode"},
    {"key": "request", "title": "Request id"}, {"key": "read", "title": "Tokens read"},
    {"key": "generated", "title": "Generated (server)"}, {"key": "wasted", "title": "Wasted"},
    {"key": "freed_ms", "title": "Stop → freed ms"}, {"key": "state", "title": "Server state"},
    {"key": "truth", "title": "Truth"},
]


def stops_rows(records: Sequence[StreamRecord], ledger: dict[str, dict[str, Any]] | None, now: float,
               limit: int = _ROWS) -> list[dict[str, Any]]:
    """The latest `limit` stopped streams, newest first, each with what the server did about it."""
    stopped = [r for r in records[-20 * limit:] if r.stop is not None][-limit:]
    rows = []
    for r in reversed(stopped):
        e = ledger.get(server_id(r)) if ledger is not None else None
        row: dict[str, Any] = {"stack": r.stack, "mode": r.close_mode, "request": r.request_id,
                               "read": r.tokens_read, "generated": "–", "wasted": "–", "freed_ms": "–",
                               "state": "unknown", "truth": "client only"}
        if e is not None:
            generated = int(e.get("generated_tokens") or 0)
            freed = e.get("freed")
            row.update(generated=generated, wasted=wasted_tokens(e, r), truth="simulator ledger")
            assert r.stop is not None
            if freed is not None:
                row["freed_ms"] = round(max(0.0, freed - r.stop) * 1e3, 1)
                row["state"] = e.get("finish_reason") or "left"
            else:
                row["state"] = "zombie (still running)" if now - r.stop > ZOMBIE_GRACE_S else "aborting"
        rows.append(row)
    return rows


class _LedgerCache:
    """The ledger by server id, fetched at most every `refresh_s` (the UI polls every ~2 s per open tab)."""

    def __init__(self, host: str, refresh_s: float = 2.0) -> None:
        self.client = LedgerClient(host, timeout=2.0)
        self.refresh_s = refresh_s
        self.at = 0.0
        self.now = 0.0
        self.by_id: dict[str, dict[str, Any]] | None = None

    def get(self) -> tuple[dict[str, dict[str, Any]] | None, float]:
        if time.monotonic() - self.at >= self.refresh_s:
            self.at = time.monotonic()
            doc = self.client.ledger()
            self.by_id = None if doc is None else ledger_by_id(doc)
            self.now = float(doc.get("now", time.monotonic())) if doc is not None else time.monotonic()
        return self.by_id, self.now


def install_stops_tab(web_ui: Any, host: Callable[[], str], records: Callable[[], Sequence[StreamRecord]]) -> None:
    """Add the Stops tab to a Locust `WebUI`; `host` and `records` are read at each poll (the host can change
    after init, when the embedded simulator starts)."""
    web_ui.template_args["extendedTabs"] = [*web_ui.template_args.get("extendedTabs", []),
                                            {"title": "Stops", "key": STOPS_KEY}]
    web_ui.template_args["extendedTables"] = [*web_ui.template_args.get("extendedTables", []),
                                              {"key": STOPS_KEY, "structure": _STRUCTURE}]
    caches: dict[str, _LedgerCache] = {}

    @web_ui.app.after_request
    def _add_stops(response: Any) -> Any:
        from flask import request

        if request.path.rstrip("/").split("/")[-2:] != ["stats", "requests"] or response.status_code != 200:
            return response
        try:
            url = host()
            ledger, now = (None, time.monotonic())
            if url:
                cache = caches.get(url) or caches.setdefault(url, _LedgerCache(url))
                ledger, now = cache.get()
            body = response.get_json()
            extended = [s for s in body.get("extended_stats") or [] if s.get("key") != STOPS_KEY]
            extended.append({"key": STOPS_KEY, "data": stops_rows(records(), ledger, now)})
            body["extended_stats"] = extended
            response.set_data(json.dumps(body))
        except Exception as exc:  # the UI's own stats must never break for the tab's sake
            web_ui.app.logger.warning("stopstorm Stops tab: %s", exc)
        return response
