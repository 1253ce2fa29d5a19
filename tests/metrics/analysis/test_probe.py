"""The stop-semantics probe: its table from known samples, and a real walk of a small matrix end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from stopstorm.metrics.analysis.probe import ProbeSample, summarise
from stopstorm.metrics.report.probe_table import format_table


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
    assert "| requests | close | 2 | 2 | 12.5 | 15 |" in table


@pytest.mark.slow
def test_probe_walks_its_matrix_and_ends_the_run(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    step_ms = 5.0
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "probe.py", "--headless", "-u", "1", "-r", "1", "-t", "60s",
         "--ignore-eos", "--max-tokens", "100", "--probe-stacks", "requests,httpx", "--probe-modes", "close,hold",
         "--probe-repeats", "2", "--probe-stop-tokens", "5", "--hold-seconds", "0.3", "--probe-json", str(out),
         "--sim-args", f"--step-base-ms {step_ms} --step-per-seq-ms 0 --prefill-per-token-ms 0"],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--run-time limit reached" not in proc.stderr, "the probe did not end the run by itself"
    assert "stopstorm stop-semantics probe" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["truth_source"] == "simulator ledger"
    cells = {(c["stack"], c["close_mode"]): c for c in doc["cells"]}
    assert set(cells) == {("requests", "close"), ("requests", "hold"), ("httpx", "close"), ("httpx", "hold")}
    for stack in ("requests", "httpx"):
        close, hold = cells[(stack, "close")], cells[(stack, "hold")]
        assert close["streams"] == 2 and close["aborted"] == 2
        # A hold is noticed only at its release: the slot is freed about --hold-seconds after Stop.
        assert hold["aborted"] == 2 and hold["abort_latency_ms_p50"] >= 300
        assert hold["wasted_tokens_mean"] > 20
        # A close is noticed at the next step boundary (a few ms; test_simulator_http bounds it to the
        # step): here only an order of magnitude below the hold, so a busy CI host cannot fail it.
        assert close["abort_latency_ms_max"] < hold["abort_latency_ms_p50"] / 5
        assert close["wasted_tokens_mean"] < hold["wasted_tokens_mean"] / 5
    assert len(doc["streams"]) == 8 and all(s["ledger"] is not None for s in doc["streams"])
