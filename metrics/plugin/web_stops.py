"""A "Stops" tab in Locust's web UI: the latest stopped streams with the server's truth about each, live.

Locust's React UI takes extra tabs from `web_ui.template_args["extendedTabs"]` / `["extendedTables"]` and their
rows from an `extended_stats` list in the `/stats/requests` answer it polls every couple of seconds; this adds
both, the documented way (Locust's examples/extend_web_ui). The rows are the `stops` of a Report: while the run
goes, one built from the records so far and the simulator's ledger (`LiveReport`, rebuilt at most every
`refresh_s`, and less often when building it costs more, so the hub is never kept busy by the tab); once the
run has ended, the run's own Report. Against a server without a ledger the tab shows the client's side only and
says so in its truth column.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from stopstorm.metrics.analysis.accounting import StopRow
from stopstorm.metrics.report.model import Report

__all__ = ["STOPS_KEY", "LiveReport", "install_stops_tab", "tab_rows"]

STOPS_KEY = "stops"
_STRUCTURE = [
    {"key": "stack", "title": "Stack"}, {"key": "mode", "title": "Close mode"},
    {"key": "request", "title": "Request id"}, {"key": "read", "title": "Tokens read"},
    {"key": "generated", "title": "Generated (server)"}, {"key": "wasted", "title": "Wasted"},
    {"key": "freed_ms", "title": "Stop → freed ms"}, {"key": "state", "title": "Server state"},
    {"key": "truth", "title": "Truth"},
]


def tab_rows(stops: Sequence[StopRow]) -> list[dict[str, Any]]:
    """The tab's rows, one per stopped stream of the Report, newest first."""
    def shown(v: Any) -> Any:
        return "–" if v is None else v

    return [{"stack": s.stack, "mode": s.close_mode, "request": s.request_id, "read": s.tokens_read,
             "generated": shown(s.generated), "wasted": shown(s.wasted),
             "freed_ms": "–" if s.stop_to_freed_s is None else round(s.stop_to_freed_s * 1e3, 1),
             "state": s.state, "truth": "client only" if s.generated is None else s.truth} for s in stops]


class LiveReport:
    """A Report of the run so far, rebuilt at most every `refresh_s` seconds, and never more often than
    `cost_factor` times the last build's own time (the UI polls every ~2 s per open tab)."""

    def __init__(self, build: Callable[[], Report], refresh_s: float = 2.0, cost_factor: float = 20.0) -> None:
        self._build = build
        self.refresh_s = refresh_s
        self.cost_factor = cost_factor
        self._at = float("-inf")
        self._cost = 0.0
        self._report: Report | None = None

    def get(self) -> Report:
        now = time.monotonic()
        if self._report is None or now - self._at >= max(self.refresh_s, self.cost_factor * self._cost):
            self._report = self._build()
            self._at = time.monotonic()
            self._cost = self._at - now
        return self._report


def install_stops_tab(web_ui: Any, report: Callable[[], Report | None]) -> None:
    """Add the Stops tab to a Locust `WebUI`; `report` gives the Report to show at each poll (None: nothing yet)."""
    web_ui.template_args["extendedTabs"] = [*web_ui.template_args.get("extendedTabs", []),
                                            {"title": "Stops", "key": STOPS_KEY}]
    web_ui.template_args["extendedTables"] = [*web_ui.template_args.get("extendedTables", []),
                                              {"key": STOPS_KEY, "structure": _STRUCTURE}]

    @web_ui.app.after_request
    def _add_stops(response: Any) -> Any:
        from flask import request

        if request.path.rstrip("/").split("/")[-2:] != ["stats", "requests"] or response.status_code != 200:
            return response
        try:
            shown = report()
            body = response.get_json()
            extended = [s for s in body.get("extended_stats") or [] if s.get("key") != STOPS_KEY]
            extended.append({"key": STOPS_KEY, "data": tab_rows(shown.stops) if shown is not None else []})
            body["extended_stats"] = extended
            response.set_data(json.dumps(body))
        except Exception as exc:  # the UI's own stats must never break for the tab's sake
            web_ui.app.logger.warning("stopstorm Stops tab: %s", exc)
        return response
