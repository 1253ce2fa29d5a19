"""Every view of one run shows the same numbers: the console, the JSON file, the HTML page, a comparison and the
web UI's Stops tab are all rendered from one Report, so a figure shown in two places is one value.

The run is real (streams through two client stacks against the simulator, stopped in three close modes); each
view is read back as a person or a program would read it (the console's text, the HTML's table cells, the
tab's JSON rows, the file's JSON) and its numbers compared with the Report's, at the precision the view prints.
"""

from __future__ import annotations

import html as htmllib
import re
import sys
import time

import gevent
import pytest
from conftest import FAST, SimPool
from locust import User, constant
from locust.argument_parser import parse_options
from locust.env import Environment
from stream_tools import Streams, make_settings

from stopstorm.metrics.figures import Distribution
from stopstorm.metrics.plugin.web_stops import STOPS_KEY, install_stops_tab
from stopstorm.metrics.report.build import RunInputs, build_report
from stopstorm.metrics.report.compare import FIGURES, format_table, run_scenario
from stopstorm.metrics.report.console import format_report
from stopstorm.metrics.report.html_page import render_html
from stopstorm.metrics.report.json_file import read_report, write_report
from stopstorm.metrics.report.model import Report, RunMeta
from stopstorm.metrics.truth.ledger import LedgerClient
from stopstorm.users.policy import StopPlan

SIM_ARGS = (*FAST, "--max-num-seqs", "2")  # few slots: the later streams queue, so queue wait is not all zero


@pytest.fixture(scope="module")
def report(sim_pool: SimPool) -> Report:
    sim = sim_pool.fresh(*SIM_ARGS)
    settings = make_settings(sim.url, max_tokens=40, hold_seconds=0.3)
    plans = [("requests", "close", StopPlan(tokens=5)), ("requests", "hold", StopPlan(tokens=5)),
             ("httpx", "close", StopPlan(tokens=8)), ("httpx", "none", StopPlan(tokens=8)),
             ("requests", "none", StopPlan()), ("httpx", "close", StopPlan(tokens=3))]
    streams = Streams()
    started = time.monotonic()
    try:
        jobs = [gevent.spawn(streams.run, stack, settings, mode, plan) for stack, mode, plan in plans]
        gevent.joinall(jobs, timeout=30, raise_error=True)
    finally:
        streams.close()
    sim.wait_idle()
    ended = time.monotonic()
    client = LedgerClient(sim.url)
    try:
        ledger = client.ledger()
    finally:
        client.close()
    records = [j.value for j in jobs]
    return build_report(RunInputs(records=records, meta=RunMeta(host=sim.url, duration_s=ended - started),
                                  started=started, ended=ended, ledger=ledger,
                                  max_num_seqs=sim.config.max_num_seqs))


def _num(text: str) -> float | None:
    text = text.strip().replace(",", "")
    return None if text in ("–", "") else float(text)


def test_the_json_file_reads_back_as_the_same_report(report: Report, tmp_path) -> None:
    path = write_report(tmp_path / "r.json", report)
    assert read_report(path) == report


def test_the_console_table_shows_the_reports_cells(report: Report) -> None:
    text = format_report(report)
    rows = {}
    for line in text.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) == 10 and parts[0] not in ("stack",) and not parts[0].startswith("-"):
            rows[(parts[0], parts[1])] = parts[2:]
    cells = {(c.stack, c.close_mode): c.figures for c in report.accounting.cells}
    cells[("all", "all")] = report.accounting.overall
    assert set(rows) == set(cells)
    for key, f in cells.items():
        streams, stopped, aborted, p50, p99, wasted, zombies, zombie_s = rows[key]
        assert _num(streams) == f.streams.value and _num(stopped) == f.stopped.value, key
        assert _num(aborted) == f.aborted.value and _num(wasted) == f.wasted_tokens.value, key
        assert _num(zombies) == f.zombies.value, key
        assert _num(zombie_s) == pytest.approx(f.zombie_slot_seconds.value, abs=0.005), key
        lat = f.abort_latency.value
        if isinstance(lat, Distribution):
            assert _num(p50) == pytest.approx(lat.p50 * 1e3, abs=0.05) and _num(p99) == pytest.approx(
                lat.p99 * 1e3, abs=0.05), key
        else:
            assert p50 == p99 == "–", key
    o = report.accounting.overall
    qw = o.queue_wait.value
    assert isinstance(qw, Distribution) and qw.max > 0  # the run did queue
    m = re.search(r"queue wait p50 / p95:\s+([\d,.]+) / ([\d,.]+) ms", text)
    assert m and _num(m.group(1)) == pytest.approx(qw.p50 * 1e3, abs=0.05)
    assert _num(m.group(2)) == pytest.approx(qw.p95 * 1e3, abs=0.05)
    m = re.search(r"goodput:\s+([\d,.]+) tok/s \(([\d,]+) tokens read", text)
    assert m and _num(m.group(1)) == pytest.approx(o.goodput_rate.value, abs=0.05)
    assert _num(m.group(2)) == o.goodput_tokens.value


def _html_summary(page: str) -> dict[str, list[str]]:
    table = page[page.index("<h2>Summary</h2>"):]
    table = table[:table.index("</table>")]
    rows = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", table):
        cells = [htmllib.unescape(c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", tr)]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_html_and_a_comparison_show_the_same_run_figures_as_the_console(report: Report) -> None:
    scenario = run_scenario(report, "run")
    page = render_html([scenario])
    html_rows = _html_summary(page)
    table = format_table([scenario])
    for key, label, digits in FIGURES:
        value = scenario.figures[key]
        shown = html_rows[label][0]
        compared = re.search(rf"\| {re.escape(label)} \| ([^|]+) \|", table)
        assert compared, label
        if value is None:
            assert shown == "–" and compared.group(1).strip() == "–", label
            continue
        assert _num(shown) == pytest.approx(value, abs=0.5 * 10 ** -digits), label
        assert _num(compared.group(1)) == pytest.approx(value, abs=0.5 * 10 ** -digits), label
    # …and those are the Report's own figures, the ones the console prints too
    o, cap = report.accounting.overall, report.capacity
    assert cap is not None and isinstance(o.queue_wait.value, Distribution)
    assert scenario.figures["queue_wait_p50"] == o.queue_wait.value.p50
    assert scenario.figures["wasted_tokens"] == o.wasted_tokens.value
    assert scenario.figures["zombie_slot_seconds"] == o.zombie_slot_seconds.value
    assert scenario.figures["ran_on"] == o.ran_on.value
    # the missed closes in words: the same sentence on the page as on the console
    finding = report.accounting.run.ran_on
    assert finding.known and htmllib.escape(f"ran on (missed closes): {finding.value}") in page
    assert f"ran on (missed closes): {finding.value}  [{finding.source}]" in format_report(report)
    assert scenario.figures["goodput"] == o.goodput_rate.value
    assert scenario.figures["throughput"] == cap.throughput.value
    assert sorted(cap.queue_wait_samples_s) == list(cap.queue_wait_samples_s)  # the CDF's samples
    assert len(cap.queue_wait_samples_s) == o.queue_wait.value.count  # one population for CDF and figure


class _Idle(User):
    wait_time = constant(1)


def test_the_stops_tab_lists_the_reports_stops(report: Report, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["locust"])  # the web UI parses the command line for its extra options
    env = Environment(user_classes=[_Idle], parsed_options=parse_options(args=[]))
    env.create_local_runner()
    web_ui = env.create_web_ui("127.0.0.1", 0, delayed_start=True)
    try:
        install_stops_tab(web_ui, lambda: report)
        body = web_ui.app.test_client().get("/stats/requests").get_json()
    finally:
        env.runner.quit()
    rows = next(s for s in body["extended_stats"] if s["key"] == STOPS_KEY)["data"]
    assert len(rows) == len(report.stops) == report.accounting.overall.stopped.value  # every stop, once
    for row, stop in zip(rows, report.stops, strict=True):
        assert (row["request"], row["stack"], row["mode"], row["read"]) == (stop.request_id, stop.stack,
                                                                           stop.close_mode, stop.tokens_read)
        assert row["wasted"] == stop.wasted and row["generated"] == stop.generated
        assert row["freed_ms"] == pytest.approx((stop.stop_to_freed_s or 0) * 1e3, abs=0.05)
    # where every stream of a cell was stopped, its stops' wasted tokens add up to the cell's
    for c in report.accounting.cells:
        if c.close_mode in ("close", "hold"):
            mine = [s for s in report.stops if (s.stack, s.close_mode) == (c.stack, c.close_mode)]
            assert len(mine) == c.figures.stopped.value == c.figures.streams.value
            assert sum(s.wasted or 0 for s in mine) == c.figures.wasted_tokens.value, (c.stack, c.close_mode)
