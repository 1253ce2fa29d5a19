"""Load shapes: the open model's arrival clock, the SLO parser, and capacity.py's step search end to end."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import ROOT

from stopstorm.users.shapes import ArrivalClock, Slo, StepResult, capacity_sentence, parse_slo


def test_arrival_clock_is_poisson_at_its_rate() -> None:
    clock = ArrivalClock(5.0, rng=random.Random(1), next_at=0.0)
    waits = [clock.claim(0.0) for _ in range(4000)]
    gaps = [b - a for a, b in pairwise(waits)]
    mean = sum(gaps) / len(gaps)
    assert mean == pytest.approx(0.2, rel=0.05)
    var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    assert var == pytest.approx(mean**2, rel=0.15)  # exponential: variance = mean²
    assert clock.late == 0 and clock.arrivals == 4000


def test_arrival_clock_counts_arrivals_that_no_free_user_took() -> None:
    clock = ArrivalClock(10.0, rng=random.Random(2), next_at=0.0)
    assert clock.claim(5.0) == 0.0  # due five seconds ago
    assert clock.late == 1 and clock.late_s == pytest.approx(5.0)


def test_slo_parsing_names_the_option() -> None:
    assert parse_slo("queue_wait_p95<2") == Slo("queue_wait", 0.95, 2.0)
    assert parse_slo(" ttft_p99 < 0.5 ") == Slo("ttft", 0.99, 0.5)
    with pytest.raises(ValueError, match="--slo"):
        parse_slo("latency<3")


def test_capacity_sentence() -> None:
    steps = [StepResult(2, 10, 0.1, True), StepResult(4, 12, 0.9, True), StepResult(6, 12, 3.2, False)]
    s = capacity_sentence(4, steps, Slo("queue_wait", 0.95, 2.0), 2, 0.3, "close:1,hold:1")
    assert s == ("At max_num_seqs 2, stop rate 0.3 and close mix close:1,hold:1, this server holds 4 users within "
                 "the SLO (queue_wait p95 < 2 s); it broke at 6 users (queue_wait p95 3.200 s).")
    assert "held no tested load" in capacity_sentence(None, steps[2:], Slo("ttft", 0.5, 1.0), 2, 0.3, "close:1")


def test_capacity_locustfile_finds_the_knee(tmp_path: Path) -> None:
    """Against the embedded simulator with one slot, the knee is exactly 2 users, derived from its settings.

    A stream is 40 tokens of 5 ms steps plus its prefill step: D ≈ 0.205 s, and the slot serves one at a time.
    At 2 users a request waits at most for the other user's whole stream (≤ D; measured 0.17 s, the think time
    takes some off), so the p95 holds the 0.4 s SLO with a margin of about one whole stream (it would need steps
    twice as slow to break). At 4 users it waits for about three streams less a think time (≈ 0.5 s; measured
    0.61 s), above 0.4 s; a loaded machine makes steps slower, which only lengthens that wait. So the search
    holds at 2, breaks at 4 and ends there: exit code 0 (a capacity search that finds its knee succeeded)."""
    out = tmp_path / "cap.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "capacity.py"), "--headless", "--slo",
         "queue_wait_p95<0.4", "--step-users", "2", "--step-seconds", "3", "--step-max-users", "8",
         "--max-tokens", "40", "--ignore-eos", "--think-time", "0.1", "--stop-probability", "0",
         "--sim-max-num-seqs", "1", "--sim-args", "--step-base-ms 5", "--capacity-json", str(out),
         "--stopstorm-report", str(tmp_path / "r.json"), "RequestsUser"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["max_num_seqs"] == 1
    judged = [(s["users"], s["held"], round(s["value_s"], 3)) for s in doc["steps"]]
    assert [(users, held) for users, held, _ in judged] == [(2, True), (4, False)], judged
    assert doc["steps"][0]["value_s"] < 0.4 < doc["steps"][1]["value_s"], judged
    assert doc["knee_users"] == 2
    assert "this server" in doc["estimate"] and doc["estimate"] in proc.stdout
    assert (tmp_path / "r.html").exists()
    # Users turned into what a planner sizes with: requests and output tokens per second in each judged window
    for step in doc["steps"]:
        assert step["request_rate"] > 0 and step["output_rate"] > 0 and step["rate_source"] == "simulator ledger"
        assert step["few_requests"] == (step["samples"] < doc["min_requests"] == 100)  # p95: 5 beyond it
    assert "At the knee (2 users): " in proc.stdout
    if any(s["few_requests"] for s in doc["steps"]):  # 1.5 s judged windows: always too few for a p95
        assert "judged on fewer than 100 requests" in proc.stdout
    # …and the run's own report carries the search: its verdict and its HTML page's capacity section
    report = json.loads((tmp_path / "r.json").read_text())
    search = report["capacity_search"]
    assert [s["users"] for s in search["steps"]] == [s["users"] for s in doc["steps"]]
    assert search["knee_users"] == doc["knee_users"] and search["estimate"] == doc["estimate"]
    assert any(s.startswith("Capacity: ") or "held no tested load" in s for s in report["verdict"]["sentences"])
    assert 'id="capacity-steps"' in (tmp_path / "r.html").read_text()
