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

from stopstorm.metrics.analysis.accounting import NOT_STOPPED
from stopstorm.metrics.analysis.over_time import OVER_TIME_COLUMNS
from stopstorm.metrics.figures import Distribution
from stopstorm.metrics.plugin.web_stops import STOPS_KEY, install_stops_tab
from stopstorm.metrics.report.build import RunInputs, build_report
from stopstorm.metrics.report.compare import FIGURES, format_table, replay_scenario, run_scenario
from stopstorm.metrics.report.console import CELL_COLUMNS, format_report
from stopstorm.metrics.report.html_page import render_html, render_report
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


def _html_table(page: str, ident: str) -> list[list[str]]:
    """The rows of `<table id=IDENT>` as a person reads them (cell texts, header row first)."""
    table = page[page.index(f'<table id="{ident}">'):]
    table = table[:table.index("</table>")]
    return [[htmllib.unescape(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr)]
            for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table)]


def _html_rows(page: str, ident: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for cells in _html_table(page, ident)[1:]}


def test_the_html_and_a_comparison_show_the_same_run_figures_as_the_console(report: Report) -> None:
    scenario = run_scenario(report, "run")
    cap = report.capacity
    assert cap is not None and cap.replay is not None and "perfect" in cap.replay.policies
    # The run beside its own replay, as `stopstorm compare --replay` shows it: the run is the baseline column
    scenarios = [scenario, replay_scenario("run", "perfect", cap.replay.policies["perfect"])]
    page = render_html(scenarios)
    html_rows = _html_rows(page, "compare")
    table = format_table(scenarios)
    for key, label, digits in FIGURES:
        value = scenario.figures[key]
        shown = html_rows[label][0].split(" (n ")[0]
        compared = re.search(rf"\| {re.escape(label)} \| ([^|]+) \|", table)
        assert compared, label
        compared_value = compared.group(1).split(" (n ")[0].strip()
        if value is None:
            assert shown == "–" and compared_value == "–", label
            continue
        assert _num(shown) == pytest.approx(value, abs=0.5 * 10 ** -digits), label
        assert _num(compared_value) == pytest.approx(value, abs=0.5 * 10 ** -digits), label
        n = scenario.counts.get(key)  # the requests behind the figure, the same in both
        assert (f"(n {n:,})" in html_rows[label][0]) == (f"(n {n:,})" in compared.group(1)) == (n is not None), label
    # …and those are the Report's own figures, the ones the console prints too
    o = report.accounting.overall
    assert isinstance(o.queue_wait.value, Distribution)
    assert scenario.figures["queue_wait_p50"] == o.queue_wait.value.p50
    assert scenario.counts["queue_wait_p50"] == o.queue_wait.value.count
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


def test_the_verdict_summary_and_cells_read_the_same_on_the_console_and_the_html_page(report: Report) -> None:
    text = format_report(report)
    page = render_report(report)
    v, s = report.verdict, report.summary
    assert v is not None and s is not None and v.sentences
    # The verdict: the same sentences, in the same order (the console wraps them)
    flat = " ".join(line.strip() for line in text.split("stopstorm summary")[0].splitlines()[1:])
    for sentence in (*v.sentences, *v.caveats):
        assert sentence in flat, sentence
        assert htmllib.escape(sentence) in page, sentence
    assert flat.index(v.sentences[0]) < flat.index(v.sentences[-1])
    # The summary block: one row per line, the same words
    html_summary = _html_rows(page, "summary")
    console_summary = {}
    for line in text.split("stopstorm summary")[1].split("stopstorm abort accounting")[0].strip().splitlines():
        label, rest = line.split(":", 1)
        console_summary[label] = rest.strip()
    assert list(console_summary) == list(html_summary)
    for label, (value, source) in html_summary.items():
        assert console_summary[label] == f"{value}  [{source}]", label
    # …and they are the Report's figures
    o = report.accounting.overall
    assert s.requests.value == o.streams.value == sum(c.figures.streams.value for c in report.accounting.cells)
    assert html_summary["requests"][0].startswith(f"{s.requests.value} streams in ")
    assert f"{o.stopped.value} stopped, {s.completed.value} read to the end, {o.interrupted.value} cut by the run's " \
           f"end, {o.failed.value} failed" in html_summary["requests"][0]
    ttft = s.ttft.value
    # every stream got a first token
    assert isinstance(ttft, Distribution) and ttft.count == len(s.ttft_samples_s) == o.streams.value
    assert html_summary["TTFT p50 / p99"][0] == f"{ttft.p50 * 1e3:,.1f} / {ttft.p99 * 1e3:,.1f} ms (n {ttft.count:,})"
    qw = o.queue_wait.value
    assert isinstance(qw, Distribution)
    assert html_summary["queue wait p50 / p95"][0].startswith(f"{qw.p50 * 1e3:,.1f} / {qw.p95 * 1e3:,.1f} ms")
    assert html_summary["client stacks"][0] == "2 ran: httpx, requests"
    # The per stack × close mode table: the console's rows, cell for cell; a stream nobody stopped once, apart
    console_rows = {}
    for line in text.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) == 10 and parts[0] != "stack" and not parts[0].startswith("-"):
            console_rows[(parts[0], parts[1])] = parts
    html_cells = _html_table(page, "cells")
    assert html_cells[0] == list(CELL_COLUMNS)
    assert {(r[0], r[1]): r for r in html_cells[1:]} == console_rows
    assert ("requests", NOT_STOPPED) in console_rows and ("httpx", "none") in console_rows
    assert console_rows[("requests", NOT_STOPPED)][2:4] == ["1", "0"]  # the one unstopped stream, and only it
    assert all(c.figures.stopped.value == c.figures.streams.value for c in report.accounting.cells
               if c.close_mode != NOT_STOPPED)
    # Counts keep one meaning: "aborted" is stopped streams the server aborted; the ledger's count is apart
    run = report.accounting.run
    split = f"ledger aborts: {run.ledger_aborts.value:,} = {o.aborted.value:,} of stopped streams"
    assert split in text and htmllib.escape(split, quote=True).replace("&#x27;", "'") in page.replace("&#x27;", "'")
    # The plots over time agree with the counts: never more zombies at once than the run had
    ot = report.over_time
    assert ot is not None and ot.columns == OVER_TIME_COLUMNS
    assert max(z or 0 for z in ot.column("zombies")) <= o.zombies.value
    width = ot.rows[1][0] - ot.rows[0][0] if len(ot.rows) > 1 else report.accounting.run.duration.value
    assert sum(ot.column("delivered_tok_s")) * width == pytest.approx(o.goodput_tokens.value, rel=1e-6)
    assert sum(ot.column("generated_tok_s")) * width == pytest.approx(cap_generated(report), rel=0.02)
    for ident in ("verdict", "summary", "cells", "over-time", "abort-latency", "ttft-cdf", "queue-wait-cdf"):
        assert f'id="{ident}"' in page, ident


def cap_generated(report: Report) -> int:
    cap = report.capacity
    assert cap is not None and isinstance(cap.generated_tokens.value, int)
    return cap.generated_tokens.value


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
    totals, rows = rows[0], rows[1:]
    o = report.accounting.overall
    assert len(rows) == len(report.stops) == o.stopped.value  # every stop, once
    # The totals row is the Report's overall figures, the console's "all all" row
    assert totals["stack"] == totals["mode"] == "all"
    assert totals["request"] == f"{o.stopped.value} stopped, {o.aborted.value} aborted"
    assert totals["wasted"] == o.wasted_tokens.value and totals["state"] == f"{o.zombies.value} zombies"
    assert totals["zombie_s"] == round(o.zombie_slot_seconds.value, 2) and totals["read"] == o.goodput_tokens.value
    # the zombie column adds up to the overall zombie slot-seconds (every stop is listed here)
    assert sum(r["zombie_s"] for r in rows) == pytest.approx(o.zombie_slot_seconds.value, abs=0.005 * len(rows))
    assert sum(1 for s in report.stops if (s.zombie_slot_s or 0) > 0) == o.zombies.value
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


# Colours as the screenshot shows them: the verdict's box, then matplotlib's tab: colours of the plots.
_VERDICT_BOX = (0xEE, 0xF5, 0xFF)
_PLOTS = {"running (tab:blue)": (0x1F, 0x77, 0xB4), "waiting (tab:orange)": (0xFF, 0x7F, 0x0E),
          "abort p99 (tab:red)": (0xD6, 0x27, 0x28), "delivered tokens (tab:cyan)": (0x17, 0xBE, 0xCF),
          "generated tokens (tab:gray)": (0x7F, 0x7F, 0x7F)}


def test_the_run_s_html_page_renders_in_headless_chromium_verdict_first(report: Report, tmp_path) -> None:
    from browser_tools import colour_counts, keep_screenshot, screenshot, seen

    page = tmp_path / "run.html"
    page.write_text(render_report(report))
    shot = screenshot(page.as_uri(), tmp_path / "run.png", (1200, 3600))
    first = colour_counts(shot, (0, 0, 1200, 800))  # the first screen: the title block, the verdict, the summary
    assert seen(first, _VERDICT_BOX, tol=3) > 20_000, "the verdict is not on the first screen"
    whole = colour_counts(shot)
    assert sum(n for px, n in whole.items() if px != (255, 255, 255)) > 0.03 * 1200 * 3600  # not a blank page
    missing = [name for name, rgb in _PLOTS.items() if seen(whole, rgb) < 50]
    assert not missing, f"plots missing from the rendered page: {missing}"
    keep_screenshot(shot, "run-report.png")
