"""stopstorm in Locust's web UI: a "Stops" tab and an "Over time" tab, a live chart, and each run's report.

Locust's React UI takes extra tabs from `web_ui.template_args["extendedTabs"]` / `["extendedTables"]` and their
rows from an `extended_stats` list in the `/stats/requests` answer it polls every couple of seconds; this adds
both, the documented way (Locust's examples/extend_web_ui). Its cells are text, so a chart cannot live in a
row: the chart is an inline SVG drawn here from the same Report (`/stopstorm/live.svg`, and a page around it,
`/stopstorm/live`), which a small script on the UI's page shows above the Stops table while that tab is open;
the "Over time" tab carries the same series as text sparklines, so the tab says it even where the script
cannot. Links on the UI's "Download Data" tab (`extendedCsvFiles`) open the live page and the last run's report
as HTML and JSON, served from the Report the run wrote (`/stopstorm/report.html`, `/stopstorm/report.json`).
The same script says what Locust's "Average size (bytes)" column holds for stopstorm's rows: tokens read.

The rows are a Report's: while the run goes, one built from the records so far and the simulator's ledger
(`LiveReport`, rebuilt at most every `refresh_s`, and less often when building it costs more, so the hub is
never kept busy by the tab); once the run has ended, the run's own Report. The Stops tab leads with a totals
row (the Report's overall figures, not a sum of the rows shown) and has a zombie column. Against a server
without a ledger the tab shows the client's side only and says so in its truth column.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from stopstorm.metrics.analysis.accounting import StopRow
from stopstorm.metrics.figures import Distribution, Figure
from stopstorm.metrics.redact import redact, redact_tree
from stopstorm.metrics.report.model import Report, report_to_json

__all__ = ["LIVE_PATH", "OVER_TIME_KEY", "REPORT_PATHS", "SIZE_COLUMN", "STOPS_KEY", "LiveReport",
           "install_stops_tab", "live_page", "live_svg", "over_time_rows", "sparkline", "tab_rows", "totals_row"]

STOPS_KEY = "stops"
OVER_TIME_KEY = "stopstorm_over_time"
LIVE_PATH = "/stopstorm/live"
REPORT_PATHS = ("/stopstorm/report.html", "/stopstorm/report.json")
SIZE_COLUMN = ("Average size (bytes)", "Average size (tokens read)")  # Locust's header, what it holds here
_STRUCTURE = [
    {"key": "stack", "title": "Stack"}, {"key": "mode", "title": "Close mode"},
    {"key": "request", "title": "Request id"}, {"key": "read", "title": "Tokens read"},
    {"key": "generated", "title": "Generated (server)"}, {"key": "wasted", "title": "Wasted"},
    {"key": "freed_ms", "title": "Stop → freed ms"}, {"key": "zombie_s", "title": "Zombie slot-s"},
    {"key": "state", "title": "Server state"}, {"key": "truth", "title": "Truth"},
]
_OVER_TIME_STRUCTURE = [
    {"key": "series", "title": "Series"}, {"key": "now", "title": "Now"}, {"key": "peak", "title": "Most"},
    {"key": "spark", "title": "Over the run (oldest left)"}, {"key": "source", "title": "Truth"},
]
_BARS = "▁▂▃▄▅▆▇█"


def _shown(v: Any) -> Any:
    return "–" if v is None else v


def tab_rows(stops: Sequence[StopRow]) -> list[dict[str, Any]]:
    """The tab's rows, one per stopped stream of the Report, newest first."""
    return [{"stack": s.stack, "mode": s.close_mode, "request": s.request_id, "read": s.tokens_read,
             "generated": _shown(s.generated), "wasted": _shown(s.wasted),
             "freed_ms": "–" if s.stop_to_freed_s is None else round(s.stop_to_freed_s * 1e3, 1),
             "zombie_s": "–" if s.zombie_slot_s is None else round(s.zombie_slot_s, 2),
             "state": s.state, "truth": "client only" if s.generated is None else s.truth} for s in stops]


def _v(f: Figure, digits: int | None = None) -> Any:
    v = f.value
    if not isinstance(v, int | float):
        return "–"
    return round(v, digits) if digits is not None else v


def totals_row(report: Report) -> dict[str, Any]:
    """The run's totals in the tab's columns: the Report's overall figures (every stopped stream, not only
    the rows listed)."""
    o = report.accounting.overall
    lat = o.abort_latency.value
    p50 = f"p50 {lat.p50 * 1e3:,.1f}" if isinstance(lat, Distribution) else "–"
    return {"stack": "all", "mode": "all", "request": f"{_v(o.stopped)} stopped, {_v(o.aborted)} aborted",
            "read": _v(o.goodput_tokens), "generated": "–", "wasted": _v(o.wasted_tokens), "freed_ms": p50,
            "zombie_s": _v(o.zombie_slot_seconds, 2), "state": f"{_v(o.zombies)} zombies",
            "truth": o.zombies.source if o.zombies.known else o.stopped.source}


def sparkline(values: Sequence[float | None], width: int = 60) -> str:
    """`values` as block characters, at most `width` of them (each the most of its span)."""
    vals = [0.0 if v is None else float(v) for v in values]
    if not vals:
        return ""
    if len(vals) > width:
        step = len(vals) / width
        vals = [max(vals[int(k * step):max(int((k + 1) * step), int(k * step) + 1)]) for k in range(width)]
    top = max(vals)
    if top <= 0:
        return _BARS[0] * len(vals)
    return "".join(_BARS[min(len(_BARS) - 1, round(v / top * (len(_BARS) - 1)))] for v in vals)


def _binned(rows: Sequence[Sequence[float]], col: int, bins: Sequence[float]) -> list[float | None]:
    """A step timeline's column as the most it reached in each bin (bins: their start times)."""
    out: list[float | None] = []
    i, last = 0, 0.0
    for k, start in enumerate(bins):
        end = bins[k + 1] if k + 1 < len(bins) else float("inf")
        peak = last
        while i < len(rows) and rows[i][0] < end:
            last = float(rows[i][col])
            if rows[i][0] >= start:
                peak = max(peak, last)
            i += 1
        out.append(max(peak, last) if peak else last)
    return out


def _series(report: Report, binned: bool = False) -> list[tuple[str, list[float | None], str]]:
    """(name, values over time, source) for the live views; `binned`: running and waiting in the over-time
    bins (the most in each), else at every change."""
    out: list[tuple[str, list[float | None], str]] = []
    cap, ot = report.capacity, report.over_time
    if cap is not None and cap.timeline.rows:
        rows = cap.timeline.rows
        if binned and ot is not None and ot.rows:
            bins = ot.column("t_s")
            out.append(("running", _binned(rows, 1, bins), cap.timeline.source or ""))
            out.append(("waiting", _binned(rows, 2, bins), cap.timeline.source or ""))
        else:
            out.append(("running", [r[1] for r in rows], cap.timeline.source or ""))
            out.append(("waiting", [r[2] for r in rows], cap.timeline.source or ""))
    if ot is not None and ot.rows:
        if any(v is not None for v in ot.column("zombies")):
            out.append(("zombies", ot.column("zombies"), "simulator ledger"))
        if any(v is not None for v in ot.column("generated_tok_s")):
            out.append(("generated tok/s", ot.column("generated_tok_s"), "simulator ledger"))
        out.append(("delivered tok/s", ot.column("delivered_tok_s"), "client records"))
    return out


def over_time_rows(report: Report) -> list[dict[str, Any]]:
    """The "Over time" tab: one row per series, its latest value, its most and its sparkline; then the totals
    the Stops tab leads with, and where the live chart is."""
    rows = []
    for name, values, source in _series(report, binned=True):
        known = [v for v in values if v is not None]
        rows.append({"series": name, "now": round(known[-1], 1) if known else "–",
                     "peak": round(max(known), 1) if known else "–", "spark": sparkline(values),
                     "source": source})
    o = report.accounting.overall
    rows.append({"series": "wasted tokens (so far)", "now": _v(o.wasted_tokens), "peak": "–", "spark": "",
                 "source": o.wasted_tokens.source})
    rows.append({"series": "live chart", "now": "–", "peak": "–", "spark": f"open .{LIVE_PATH}", "source": ""})
    return rows


# --- the live chart ------------------------------------------------------------------------------------------

_COLOURS = {"running": "#1f77b4", "waiting": "#ff7f0e", "zombies": "#8c564b", "generated tok/s": "#7f7f7f",
            "delivered tok/s": "#17becf"}


def _polyline(ts: Sequence[float], vs: Sequence[float | None], x0: float, y0: float, w: float, h: float,
              t_max: float, v_max: float, colour: str) -> str:
    pts = []
    last_y = None
    for t, v in zip(ts, vs, strict=False):
        x = x0 + w * (t / t_max if t_max else 0)
        y = y0 + h - h * ((v or 0) / v_max if v_max else 0)
        if last_y is not None:
            pts.append(f"{x:.1f},{last_y:.1f}")  # a step: hold the last value until this change
        pts.append(f"{x:.1f},{y:.1f}")
        last_y = y
    if last_y is not None:
        pts.append(f"{x0 + w:.1f},{last_y:.1f}")
    return f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{" ".join(pts)}"/>'


def live_svg(report: Report | None, width: int = 900) -> str:
    """Running/waiting/zombies and tokens/s over time as one inline SVG (no library: cheap on the hub)."""
    panel_h, gap, left, top = 110, 34, 52, 18
    height = top + 2 * panel_h + gap + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    if report is None:
        parts.append('<text x="20" y="40">No run yet: start one, and the chart follows it.</text></svg>')
        return "".join(parts)
    w = width - left - 150
    series = dict((name, (values, src)) for name, values, src in _series(report))
    cap, ot = report.capacity, report.over_time
    t_slots = [r[0] for r in cap.timeline.rows] if cap is not None else []
    t_bins = ot.column("t_s") if ot is not None else []
    t_max = max([*t_slots[-1:], *t_bins[-1:], 1.0])
    if ot is not None and len(t_bins) > 1:
        t_max = max(t_max, t_bins[-1] + (t_bins[1] - t_bins[0]))
    panels = [("requests", ("running", "waiting", "zombies"), [t_slots, t_slots, t_bins]),
              ("tokens/s", ("generated tok/s", "delivered tok/s"), [t_bins, t_bins])]
    for k, (unit, names, times) in enumerate(panels):
        y0 = top + k * (panel_h + gap)
        present = [(n, t) for n, t in zip(names, times, strict=True) if n in series]
        v_max = max([1.0, *(v or 0 for n, _t in present for v in series[n][0])])
        if unit == "requests" and cap is not None and cap.max_num_seqs:
            v_max = max(v_max, cap.max_num_seqs)
        v_max *= 1.15
        parts.append(f'<rect x="{left}" y="{y0}" width="{w}" height="{panel_h}" fill="none" stroke="#bbb"/>')
        parts.append(f'<text x="{left - 6}" y="{y0 + 10}" text-anchor="end">{v_max:,.0f}</text>'
                     f'<text x="{left - 6}" y="{y0 + panel_h}" text-anchor="end">0</text>'
                     f'<text x="{left}" y="{y0 - 5}" fill="#444">{unit}</text>')
        if unit == "requests" and cap is not None and cap.max_num_seqs:
            y = y0 + panel_h - panel_h * cap.max_num_seqs / v_max
            parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="black" '
                         f'stroke-dasharray="5,4"/><text x="{left + w + 6}" y="{y + 4:.1f}">max_num_seqs '
                         f"{cap.max_num_seqs}</text>")
        for j, (name, ts) in enumerate(present):
            values = series[name][0]
            parts.append(_polyline(ts, values, left, y0, w, panel_h, t_max, v_max, _COLOURS[name]))
            known = [v for v in values if v is not None]
            now = f" {known[-1]:,.0f}" if known else ""
            parts.append(f'<text x="{left + w + 6}" y="{y0 + 22 + 14 * j}" fill="{_COLOURS[name]}">'
                         f"{html.escape(name)}{now}</text>")
    parts.append(f'<text x="{left}" y="{height - 8}">0 s</text><text x="{left + w}" y="{height - 8}" '
                 f'text-anchor="end">{t_max:,.0f} s since the run started</text></svg>')
    return "".join(parts)


def live_page(report: Report | None, written: Report | None) -> str:
    """The live chart's page: the chart, the totals, links to the written report; it reloads every 2 s."""
    rows = ""
    if report is not None:
        t = totals_row(report)
        rows = (f"<p>{html.escape(str(t['request']))}; {html.escape(str(t['state']))} holding "
                f"{html.escape(str(t['zombie_s']))} slot-s; wasted tokens {html.escape(str(t['wasted']))}; "
                f"tokens read {html.escape(str(t['read']))}; abort latency {html.escape(str(t['freed_ms']))} ms "
                f"[{html.escape(str(t['truth']))}]</p>")
        if report.verdict is not None:
            rows += "".join(f'<p class="v">{html.escape(s)}</p>' for s in report.verdict.sentences)
    links = ('<p>The last run\'s report: <a href="./report.html">HTML</a> · <a href="./report.json">JSON</a></p>'
             if written is not None else "<p>No report written yet: it is written when a run ends.</p>")
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">'
            "<title>stopstorm live</title><style>body{font-family:sans-serif;margin:1em;color:#222}"
            ".v{background:#eef5ff;padding:.3em .6em;margin:.2em 0}</style></head><body>"
            f"<h2>stopstorm: the run over time</h2>{live_svg(report)}{rows}{links}</body></html>\n")
    return redact(page)


# The script on Locust's page: the chart above the Stops table while that tab is open, and the size column's
# header saying what it holds. It only adds to the page; if Locust's markup changes it finds nothing and stops.
_SCRIPT = """<script>(function () {
  var LIVE = "./stopstorm/live.svg";
  function tick() {
    document.querySelectorAll("th").forEach(function (th) {
      if (th.textContent === %(old)s) { th.textContent = %(new)s; th.title = "stopstorm: tokens the user read"; }
    });
    var onStops = new URLSearchParams(location.search).get("tab") === "stops";
    var box = document.getElementById("stopstorm-live");
    if (!onStops) { if (box) { box.remove(); } return; }
    var table = document.querySelector("table");
    if (!table) { return; }
    var holder = table.closest(".MuiTableContainer-root") || table;
    if (!box) {
      box = document.createElement("div");
      box.id = "stopstorm-live";
      box.style.margin = "8px 0";
      box.innerHTML = '<img alt="stopstorm: running, waiting, zombies and tokens over time" style="max-width:100%%">' +
        '<div style="font-size:12px;color:#666">Live: <a href="./stopstorm/live" target="_blank">open the chart</a>' +
        ' · the last run\\'s report: <a href="./stopstorm/report.html" target="_blank">HTML</a>, ' +
        '<a href="./stopstorm/report.json" target="_blank">JSON</a></div>';
    }
    if (box.nextSibling !== holder) { holder.parentNode.insertBefore(box, holder); }
    box.querySelector("img").src = LIVE + "?t=" + Date.now();
  }
  setInterval(tick, 2000);
  setTimeout(tick, 300);
})();</script>"""


def _script() -> str:
    return _SCRIPT % {"old": json.dumps(SIZE_COLUMN[0]), "new": json.dumps(SIZE_COLUMN[1])}


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


def _written_default() -> Report | None:
    from stopstorm.metrics.plugin.state import RUN

    return RUN.report


def install_stops_tab(web_ui: Any, report: Callable[[], Report | None],
                      written: Callable[[], Report | None] = _written_default) -> None:
    """Add the Stops and Over time tabs, the live chart, the report links and the page script to a Locust
    `WebUI`. `report` gives the Report to show at each poll (None: nothing yet); `written`, the last run's
    written Report (default: the run state's)."""
    args = web_ui.template_args
    args["extendedTabs"] = [*args.get("extendedTabs", []), {"title": "Stops", "key": STOPS_KEY},
                            {"title": "Over time", "key": OVER_TIME_KEY}]
    args["extendedTables"] = [*args.get("extendedTables", []), {"key": STOPS_KEY, "structure": _STRUCTURE},
                              {"key": OVER_TIME_KEY, "structure": _OVER_TIME_STRUCTURE}]
    args["extendedCsvFiles"] = [*args.get("extendedCsvFiles", []),
                                {"href": f".{LIVE_PATH}", "title": "stopstorm: live chart (running, waiting, "
                                 "zombies, tokens over time)"},
                                {"href": f".{REPORT_PATHS[0]}", "title": "stopstorm: the last run's report (HTML)"},
                                {"href": f".{REPORT_PATHS[1]}", "title": "stopstorm: the last run's report (JSON)"}]
    app = web_ui.app
    rendered: dict[int, str] = {}  # the HTML of a written Report, rendered once (matplotlib takes a second)

    @app.route(LIVE_PATH)
    def _live() -> Any:
        return app.response_class(live_page(report(), written()), mimetype="text/html")

    @app.route(f"{LIVE_PATH}.svg")
    def _live_svg() -> Any:
        return app.response_class(redact(live_svg(report())), mimetype="image/svg+xml",
                                  headers={"Cache-Control": "no-store"})

    @app.route(REPORT_PATHS[0])
    def _report_html() -> Any:
        shown = written()
        if shown is None:
            return app.response_class("<p>No report yet: it is written when a run ends.</p>", status=404,
                                      mimetype="text/html")
        key = id(shown)
        if key not in rendered:
            from stopstorm.metrics.report.html_page import render_report

            rendered.clear()
            rendered[key] = render_report(shown, "web UI run")
        return app.response_class(rendered[key], mimetype="text/html")

    @app.route(REPORT_PATHS[1])
    def _report_json() -> Any:
        shown = written()
        if shown is None:
            return app.response_class('{"error": "no report yet: it is written when a run ends"}', status=404,
                                      mimetype="application/json")
        return app.response_class(json.dumps(redact_tree(report_to_json(shown)), default=str),
                                  mimetype="application/json")

    @app.after_request
    def _add_stops(response: Any) -> Any:
        from flask import request

        if response.status_code != 200:
            return response
        try:
            if request.path == "/" and response.mimetype == "text/html":
                page = response.get_data(as_text=True)
                if "</body>" in page and "stopstorm-live" not in page:
                    response.set_data(page.replace("</body>", _script() + "</body>", 1))
                return response
            if request.path.rstrip("/").split("/")[-2:] != ["stats", "requests"]:
                return response
            shown = report()
            body = response.get_json()
            extended = [s for s in body.get("extended_stats") or [] if s.get("key") not in (STOPS_KEY, OVER_TIME_KEY)]
            stops = ([totals_row(shown), *tab_rows(shown.stops)] if shown is not None else [])
            extended.append({"key": STOPS_KEY, "data": stops})
            extended.append({"key": OVER_TIME_KEY, "data": over_time_rows(shown) if shown is not None else []})
            body["extended_stats"] = extended
            response.set_data(json.dumps(body))
        except Exception as exc:  # the UI's own stats must never break for the tab's sake
            app.logger.warning("stopstorm web UI: %s", exc)
        return response
