"""The Stops tab: rows joined with the ledger, and served through Locust's own web UI extension point."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from locust import User, constant
from locust.argument_parser import parse_options
from locust.env import Environment

from stopstorm.metrics.analysis.accounting import account, stop_rows
from stopstorm.metrics.plugin.web_stops import (
    LIVE_PATH,
    OVER_TIME_KEY,
    REPORT_PATHS,
    SIZE_COLUMN,
    STOPS_KEY,
    LiveReport,
    install_stops_tab,
    sparkline,
    tab_rows,
    totals_row,
)
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.report.build import RunInputs, build_report
from stopstorm.metrics.report.model import Report, RunMeta, report_to_json
from stopstorm.metrics.truth.ledger import LedgerSnapshot


def _record(rid: str, mode: str, stop: float | None, read: int) -> StreamRecord:
    return StreamRecord(stack="requests", close_mode=mode, endpoint="chat", request_id=rid, stop_plan="tokens:5",
                        wall_start=0.0, sent=stop - 1 if stop else 0.0, stop=stop, tokens_at_stop=read,
                        tokens=read)


def _entry(rid: str, generated: int, freed: float | None, reason: str | None) -> dict[str, object]:
    return {"request_id": rid, "endpoint": "chat", "stream": True, "prompt_tokens": 5, "max_tokens": 100,
            "target_tokens": 100, "arrival": 9.0, "scheduled": 9.0, "generated_tokens": generated, "freed": freed,
            "finish_reason": reason}


def test_rows_join_each_stop_with_the_ledger() -> None:
    records = [_record("a", "close", 10.0, 5), _record("b", "none", None, 9), _record("c", "hold", 11.0, 3)]
    ledger = LedgerSnapshot.from_json({"now": 12.0, "requests": [_entry("chatcmpl-a", 5, 10.015, "abort"),
                                                                 _entry("chatcmpl-c", 40, None, None)]})
    rows = tab_rows(stop_rows(records, ledger))
    assert [r["request"] for r in rows] == ["c", "a"]  # stopped streams only, newest first
    assert rows[1] | {} == {"stack": "requests", "mode": "close", "request": "a", "read": 5, "generated": 5,
                            "wasted": 0, "freed_ms": 15.0, "zombie_s": 0.0, "state": "abort",
                            "truth": "simulator ledger"}
    assert rows[0]["state"] == "zombie (still running)" and rows[0]["wasted"] == 37
    assert rows[0]["zombie_s"] == 1.0  # held from Stop (11.0) to the ledger's now (12.0): the zombie column
    client_only = tab_rows(stop_rows(records, None))
    assert client_only[0]["truth"] == "client only" and client_only[0]["generated"] == "–"


class _Idle(User):
    wait_time = constant(1)


def test_tab_is_served_by_locust_s_web_ui(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["locust"])  # the web UI parses the command line for its extra options
    env = Environment(user_classes=[_Idle], parsed_options=parse_options(args=[]))
    env.create_local_runner()
    web_ui = env.create_web_ui("127.0.0.1", 0, delayed_start=True)
    try:
        records = [_record("a", "close", 10.0, 5)]
        builds: list[float] = []

        def build() -> Report:  # as the plugin's live view builds it: the run so far, client side only here
            builds.append(0.0)
            return Report(RunMeta(), account(records, None, None, 1.0), stop_rows(records, None))

        live = LiveReport(build, refresh_s=60.0)
        install_stops_tab(web_ui, live.get)
        assert {"title": "Stops", "key": STOPS_KEY} in web_ui.template_args["extendedTabs"]
        body = web_ui.app.test_client().get("/stats/requests").get_json()
        tab = next(s for s in body["extended_stats"] if s["key"] == STOPS_KEY)
        assert tab["data"][0]["stack"] == "all" and tab["data"][0]["request"] == "1 stopped, – aborted"  # totals
        assert tab["data"][1]["request"] == "a" and tab["data"][1]["truth"] == "client only"
        assert "stats" in body  # Locust's own figures untouched
        web_ui.app.test_client().get("/stats/requests")
        assert len(builds) == 1  # polled again within refresh_s: the same Report, not a rebuild
    finally:
        env.runner.quit()  # the web UI never started its server (delayed_start): nothing to stop


def _web_ui(monkeypatch: pytest.MonkeyPatch) -> tuple[Environment, Any]:
    monkeypatch.setattr(sys, "argv", ["locust"])
    env = Environment(user_classes=[_Idle], parsed_options=parse_options(args=[]))
    env.create_local_runner()
    return env, env.create_web_ui("127.0.0.1", 0, delayed_start=True)


def test_the_live_chart_the_report_links_and_the_page_script(monkeypatch: pytest.MonkeyPatch) -> None:
    records = [_record("a", "close", 10.0, 5), _record("c", "hold", 11.0, 3)]
    for r in records:
        r.chunk_times, r.chunk_tokens = [r.sent + 0.5], [r.tokens]
    ledger = LedgerSnapshot.from_json({"now": 12.0, "requests": [_entry("chatcmpl-a", 5, 10.015, "abort"),
                                                                 _entry("chatcmpl-c", 40, None, None)]})
    live = build_report(RunInputs(records=records, meta=RunMeta(), started=8.0, ended=12.0, ledger=ledger,
                                  counterfactuals=False))
    written: list[Report] = []
    env, web_ui = _web_ui(monkeypatch)
    try:
        install_stops_tab(web_ui, lambda: live, lambda: written[-1] if written else None)
        client = web_ui.app.test_client()
        links = {f["href"] for f in web_ui.template_args["extendedCsvFiles"]}  # the Download Data tab
        assert {f".{LIVE_PATH}", *(f".{p}" for p in REPORT_PATHS)} <= links
        index = client.get("/").get_data(as_text=True)
        assert "stopstorm-live" in index and SIZE_COLUMN[1] in index  # the script: the chart, the size column
        svg = client.get(f"{LIVE_PATH}.svg")
        assert svg.mimetype == "image/svg+xml" and svg.get_data(as_text=True).startswith("<svg")
        assert "running" in svg.get_data(as_text=True) and "zombies" in svg.get_data(as_text=True)
        page = client.get(LIVE_PATH).get_data(as_text=True)
        assert "No report written yet" in page and 'http-equiv="refresh"' in page
        assert client.get(REPORT_PATHS[0]).status_code == client.get(REPORT_PATHS[1]).status_code == 404
        over = next(s for s in client.get("/stats/requests").get_json()["extended_stats"] if s["key"] == OVER_TIME_KEY)
        series = {row["series"]: row for row in over["data"]}
        assert series["zombies"]["peak"] == 1 and set(series["zombies"]["spark"]) <= set("▁▂▃▄▅▆▇█")
        assert series["wasted tokens (so far)"]["now"] == live.accounting.overall.wasted_tokens.value
        written.append(live)  # the run's report, once written: served as its own JSON and HTML
        doc = client.get(REPORT_PATHS[1]).get_json()
        assert doc == json.loads(json.dumps(report_to_json(live), default=str))
        html_page = client.get(REPORT_PATHS[0]).get_data(as_text=True)
        assert 'id="verdict"' in html_page and 'id="cells"' in html_page
        assert "./report.html" in client.get(LIVE_PATH).get_data(as_text=True)
    finally:
        env.runner.quit()


def test_sparklines_and_totals() -> None:
    assert sparkline([0, 1, 2, 4]) == "▁▃▅█" and sparkline([]) == "" and sparkline([None, 0]) == "▁▁"
    assert len(sparkline(list(range(1000)), width=60)) == 60
    records = [_record("a", "close", 10.0, 5)]
    report = Report(RunMeta(), account(records, None, None, 1.0), stop_rows(records, None))
    row = totals_row(report)
    assert row["stack"] == "all" and row["read"] == 5 and row["wasted"] == "–"  # unknown, not 0
