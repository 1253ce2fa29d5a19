"""Every benchmark script still starts: its imports resolve and its options parse (`--help`), so a change to the
code it measures cannot leave it broken until the next time someone runs it (bench_timing once imported a
function the typed report had removed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py") if p.name != "bench_tools.py")


def test_every_benchmark_is_listed() -> None:
    assert {"bench_stacks.py", "bench_timing.py", "bench_simulator.py", "bench_replay.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_benchmark_starts(script: str) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower(), out.stdout[-500:]
