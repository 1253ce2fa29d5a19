"""--fail-on end to end: a broken threshold's exit status from a run, from capacity.py and from `stopstorm
scenarios`; a bad expression refused before any load (exit 2, one line). The master/worker case is in
test_lifecycle.py (a killed worker and a broken threshold on the master)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, ROOT

from stopstorm.metrics.analysis.thresholds import EXIT_THRESHOLD_BROKEN

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_a_bad_expression_is_refused_before_any_load(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "1", "-t", "5s",
                          "--fail-on", "zombie_seconds>0", "--stopstorm-report", str(tmp_path / "r.json")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "--fail-on 'zombie_seconds>0': no figure 'zombie_seconds'" in text and "Traceback" not in text
    assert "embedded simulator" not in text and not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_capacity_run_gated_by_a_threshold(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "capacity.py"), "--headless", "--slo",
         "queue_wait_p95<5", "--step-users", "2", "--step-seconds", "2", "--step-max-users", "2",
         "--max-tokens", "20", "--think-time", "0.05", "--stop-probability", "0", "--sim-args", " ".join(FAST),
         "--capacity-json", str(tmp_path / "cap.json"), "--stopstorm-report", str(tmp_path / "r.json"),
         "--fail-on", "streams>0", "--fail-on", "failed_ratio>0.5", "RequestsUser"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=90, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_THRESHOLD_BROKEN, text[-3000:]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [t["held"] for t in doc["thresholds"]] == [False, True]
    assert "BROKEN  streams>0" in text and (tmp_path / "cap.json").exists()


@pytest.mark.slow
def test_scenarios_exit_with_the_broken_threshold(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stopstorm", "scenarios", "--scenario", "held=--close-mix hold:1 --hold-seconds 1",
         "--scenario", "closed=--close-mix close:1", "--sim-args", "--max-num-seqs 2 --step-base-ms 5",
         "--out", str(tmp_path), "--timeout", "60", "--fail-on", "zombie_slot_seconds>0", "--", "--headless",
         "-u", "4", "-r", "4", "-t", "3s", "--max-tokens", "60", "--ignore-eos", "--stop-probability", "1",
         "--stop-at", "tokens:fixed:5", "RequestsUser"], env=ENV, capture_output=True, text=True, timeout=150)
    text = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_THRESHOLD_BROKEN, text[-3000:]
    assert "held: BROKEN  zombie_slot_seconds>0" in text and "closed: held    zombie_slot_seconds>0  (0)" in text
    held = json.loads((tmp_path / "held.json").read_text())
    assert held["thresholds"][0]["held"] is False


def test_scenarios_refuse_a_bad_expression(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "stopstorm", "scenarios", "--scenario", "a=-u 1", "--fail-on",
                           "zombies>", "--out", str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--fail-on 'zombies>'" in proc.stderr, proc.stderr
