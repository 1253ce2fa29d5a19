"""`stopstorm scenarios`: two scenarios back to back against one embedded simulator, then the comparison."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from stopstorm.scenarios import _scenario


def test_scenario_argument_names_the_option() -> None:
    assert _scenario("hold=--close-mix hold:1 --hold-seconds 2") == ("hold", ["--close-mix", "hold:1",
                                                                               "--hold-seconds", "2"])
    with pytest.raises(argparse.ArgumentTypeError, match="--scenario"):
        _scenario("no equals sign")


def test_two_scenarios_against_one_server(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "stopstorm", "scenarios", "--scenario", "held=--close-mix hold:1 --hold-seconds 1",
         "--scenario", "closed=--close-mix close:1", "--sim-args", "--max-num-seqs 2 --step-base-ms 5",
         "--out", str(tmp_path), "--timeout", "60", "--", "--headless", "-u", "6", "-r", "6", "-t", "3s",
         "--max-tokens", "60", "--ignore-eos", "--stop-probability", "1", "--stop-at", "tokens:fixed:5",
         "RequestsUser"], env=env, capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    held, closed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("held", "closed"))
    assert held["meta"]["host"] == closed["meta"]["host"]  # the same server for both
    # Every stream was stopped after 5 tokens: held ones ran on (zombies), closed ones were aborted at once.
    assert held["overall"]["figures"]["zombie_slot_seconds"]["value"] > 0
    assert closed["overall"]["figures"]["zombie_slot_seconds"]["value"] == 0
    assert "| zombie slot-seconds |" in proc.stdout and (tmp_path / "compare.html").exists()


@pytest.mark.slow
def test_repeated_scenarios_are_pooled_with_their_spread(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "stopstorm", "scenarios", "--scenario", "held=--close-mix hold:1 --hold-seconds 1",
         "--scenario", "closed=--close-mix close:1", "--repeat", "2", "--sim-args",
         "--max-num-seqs 2 --step-base-ms 5", "--out", str(tmp_path), "--timeout", "60", "--", "--headless", "-u",
         "4", "-r", "4", "-t", "2s", "--max-tokens", "40", "--ignore-eos", "--stop-probability", "1", "--stop-at",
         "tokens:fixed:5", "RequestsUser"], env=env, capture_output=True, text=True, timeout=200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("scenario ")]
    assert ran == ["scenario held.1", "scenario closed.1", "scenario held.2", "scenario closed.2"]  # interleaved
    assert all((tmp_path / f"{n}.{k}.json").exists() for n in ("held", "closed") for k in (1, 2))
    # One column per scenario, not per run; the held zombies' slot time against the closed runs', in words
    head = next(line for line in proc.stdout.splitlines() if line.startswith("| figure |"))
    assert head.count("|") == 1 + 1 + 6  # figure, held, held's two replays, closed, closed's two replays
    assert "closed's zombies hold" in proc.stdout and "repeats " in proc.stdout
