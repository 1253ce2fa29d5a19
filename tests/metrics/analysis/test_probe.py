"""The stop-semantics probe: its table from known samples, and a real walk of a small matrix end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from stopstorm.metrics.analysis.probe import ProbeCell, ProbeSample, summarise
from stopstorm.metrics.report.probe_table import format_progress, format_table, probe_verdict, stop_words
from stopstorm.users.policy import StopPlan
from stopstorm.users.probe import parse_early


def _sample(mode: str, stop: float, freed: float | None, reason: str | None, generated: int,
            read: int = 20) -> ProbeSample:
    return ProbeSample("requests", mode, stop, read, None, stop + 0.0002, freed, reason, generated)


def test_summary_of_known_samples() -> None:
    samples = [
        _sample("close", 10.0, 10.015, "abort", 20),
        _sample("close", 20.0, 20.010, "abort", 21),
        _sample("hold", 30.0, None, None, 90),
        _sample("hold", 40.0, 41.0, "length", 200),
    ]
    cells = {c.close_mode: c for c in summarise(samples)}
    close, hold = cells["close"], cells["hold"]
    assert close.aborted == 2 and close.outcome == "aborted: slot freed"
    assert close.abort_latency_ms_p50 == pytest.approx(12.5) and close.abort_latency_ms_max == pytest.approx(15.0)
    assert close.wasted_tokens_mean == 0.5  # 0 and 1 token beyond the 20 read
    assert hold.aborted == 0 and hold.abort_latency_ms_p50 is None
    assert hold.outcome == "still running when the probe gave up (1)"
    assert hold.wasted_tokens_mean == pytest.approx((70 + 180) / 2)
    table = format_table(list(cells.values()))
    assert "| requests | close | – | 2 | 2 | 0 | 0 | 12.5 | 15 |" in table


def _early(stack: str, stop: str, reason: str | None, registered: bool = True) -> ProbeSample:
    return ProbeSample(stack, "close", 1.0, 0, None, None, 1.02 if reason else None, reason,
                       16 if reason == "length" else 1, stop, registered)


def test_early_rows_count_missed_closes_and_requests_that_never_arrived() -> None:
    samples = [_early("requests", "seconds:0.010", "abort"), _early("requests", "seconds:0.010", "length"),
               _early("requests", "seconds:0.010", None, registered=False),
               _early("httpx", "seconds:0.010", None, registered=False),
               _early("httpx", "first-token", "abort"), _early("httpx", "first-token", "abort")]
    cells = {(c.stack, c.stop): c for c in summarise(samples)}
    mixed = cells[("requests", "seconds:0.010")]
    assert (mixed.aborted, mixed.ran_on, mixed.never_reached) == (1, 1, 1)
    assert mixed.outcome == "mixed: 1/3 aborted, 1 ran on, 1 never reached the engine" and mixed.early
    assert cells[("httpx", "seconds:0.010")].outcome == "never reached the engine: no work"
    assert cells[("httpx", "first-token")].outcome == "aborted: slot freed"
    verdict = probe_verdict(list(cells.values()))
    assert verdict[0] == ("an early `close` (10 ms after send): 1 of 2 requests the server registered ran on (50 %) "
                          "— requests 1/2; 2 of 4 closed before the engine registered them (no work)")
    assert verdict[1] == "an early `close` (at the first token): 0 of 2 requests the server registered ran on (0 %)"
    assert format_progress(mixed, 3, 8) == ("probe cell 3/8: requests close 10 ms after send: mixed: 1/3 aborted, "
                                            "1 ran on, 1 never reached the engine (3 streams, stop→freed p50 20 ms, "
                                            "6 tokens wasted a stream)")
    table = format_table(list(cells.values()))
    assert "| requests | close | 10 ms after send | 3 | 1 | 1 | 1 |" in table


def _cell(stack: str, mode: str, aborted: int, ran_on: int = 0, p50: float | None = 15.0) -> ProbeCell:
    return ProbeCell(stack, mode, 3, 0, aborted, p50 if aborted else None, p50 if aborted else None, 0.2,
                     0.0 if aborted == 3 else 180.0, "x", "tokens:20", ran_on, 0)


def test_the_verdict_says_what_to_do() -> None:
    cells = [_cell(s, "close", 3) for s in ("requests", "openai", "openai-async")]
    cells += [_cell("requests", "drop", 3), _cell("openai", "drop", 0, 3), _cell("openai-async", "drop", 0, 3)]
    cells += [_cell("requests", "hold", 3, p50=1015.0), _cell("openai", "hold", 3, p50=1003.0)]
    verdict = probe_verdict(cells)
    assert verdict == [
        "`close` (after 20 tokens) frees the slot for every stack (stop→freed at most 15 ms)",
        "`drop` (after 20 tokens) frees the slot for requests (stop→freed at most 15 ms)",
        "openai SDK, sync and async: `drop` never closes the stream — call `close()`",
        "`hold` (socket kept open, nothing read) is never noticed while held: the server generates on until the "
        "socket closes (stop→freed p50 1,003–1,015 ms), 0 tokens wasted a stream",
    ]


def test_early_stop_points_parse() -> None:
    assert parse_early("seconds:0.01,first-token") == [StopPlan(seconds=0.01), StopPlan(first_token=True)]
    assert parse_early("none") == [] and parse_early("tokens:3") == [StopPlan(tokens=3)]
    for bad in ("", "seconds:-1", "soon", "tokens:0"):
        with pytest.raises(ValueError, match="--probe-early"):
            parse_early(bad)
    assert stop_words("seconds:0.010") == "10 ms after send" and stop_words("tokens:20") == "after 20 tokens"


@pytest.mark.slow
def test_probe_walks_its_matrix_and_ends_the_run(tmp_path: Path) -> None:
    out, report = tmp_path / "probe.json", tmp_path / "probe-report.json"
    step_ms = 5.0
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "probe.py"), "--headless", "-u", "1", "-r", "1", "-t",
         "60s", "--ignore-eos", "--max-tokens", "100", "--probe-stacks", "requests,httpx", "--probe-modes",
         "close,hold", "--probe-repeats", "2", "--probe-stop-tokens", "5", "--hold-seconds", "0.3",
         "--probe-early", "seconds:0.01,first-token", "--probe-early-repeats", "2", "--probe-json", str(out),
         "--probe-report", str(report),
         "--sim-args", f"--step-base-ms {step_ms} --step-per-seq-ms 0 --prefill-per-token-ms 0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--run-time limit reached" not in proc.stderr, "the probe did not end the run by itself"
    assert "stopstorm stop-semantics probe" in proc.stdout and "verdict:" in proc.stdout
    # a progress line per cell while it runs: 2 stacks × (2 modes + 2 early rows)
    progress = [line for line in proc.stderr.splitlines() if "probe cell " in line]
    assert len(progress) == 8 and "probe cell 8/8: httpx close at the first token" in progress[-1]
    doc = json.loads(out.read_text())
    assert doc["truth_source"] == "simulator ledger" and doc["schema_version"] == 2
    cells = {(c["stack"], c["close_mode"], c["stop"]): c for c in doc["cells"]}
    early = {"seconds:0.010", "first-token"}
    assert set(cells) == {(s, m, st) for s in ("requests", "httpx")
                          for m, st in [("close", "tokens:5"), ("hold", "tokens:5")] + [("close", e) for e in early]}
    for stack in ("requests", "httpx"):
        close, hold = cells[(stack, "close", "tokens:5")], cells[(stack, "hold", "tokens:5")]
        assert close["streams"] == 2 and close["aborted"] == 2
        # A hold is noticed only at its release: the slot is freed about --hold-seconds after Stop.
        assert hold["aborted"] == 2 and hold["abort_latency_ms_p50"] >= 300
        assert hold["wasted_tokens_mean"] > 20
        # A close is noticed at the next step boundary (a few ms; test_simulator_http bounds it to the
        # step): here only an order of magnitude below the hold, so a busy CI host cannot fail it.
        assert close["abort_latency_ms_max"] < hold["abort_latency_ms_p50"] / 5
        assert close["wasted_tokens_mean"] < hold["wasted_tokens_mean"] / 5
        # The simulator acts on every close at once (its default, as vLLM here): no early close runs on
        for stop in early:
            row = cells[(stack, "close", stop)]
            assert row["streams"] == 2 and row["ran_on"] == 0 and row["aborted"] + row["never_reached"] == 2
    assert len(doc["streams"]) == 16 and sum(s["early"] for s in doc["streams"]) == 8
    assert any("an early `close` (10 ms after send)" in line for line in doc["verdict"])
    # Its own run report (the matrix's 8 streams, every one in the ledger), and never the main run's files
    rep = json.loads(report.read_text())
    assert rep["overall"]["figures"]["streams"]["value"] == 8
    assert rep["run"]["figures"]["unjoined_streams"]["value"] == 0
    assert rep["overall"]["figures"]["ran_on"]["value"] == 0 and rep["meta"]["scenario"] == "stop-semantics probe"
    assert (tmp_path / "probe-report.html").is_file()
    assert not (tmp_path / "stopstorm-report.json").exists() and not (tmp_path / "stopstorm-report.html").exists()
