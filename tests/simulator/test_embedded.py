"""The embedded simulator: EmbeddedSimulator's process handling, and a headless Locust run that starts one.

A run with no --host must start a simulator, drive load at it, and leave no simulator process behind.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import FAST, ROOT, pid_gone, wait_until

from stopstorm.simulator.launcher import EmbeddedSimulator, SimulatorStartError

STARTED = re.compile(r"started the embedded simulator at (http://127\.0\.0\.1:\d+) \(pid (\d+)")


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read()


def test_start_serves_on_loopback_and_stop_ends_the_process(tmp_path):
    log = tmp_path / "sim.log"
    sim = EmbeddedSimulator([*FAST, "--max-num-seqs", "3"], log_path=str(log))
    assert sim.pid is None and sim.url is None
    url = sim.start()
    pid = sim.pid
    try:
        assert url == sim.url
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert pid is not None and not pid_gone(pid)
        assert get(f"{url}/health")[0] == 200
        status, body = get(f"{url}/stopstorm/stats")
        assert status == 200 and b'"max_num_seqs":3' in body
        with pytest.raises(RuntimeError, match="already started"):
            sim.start()
    finally:
        code = sim.stop()
    # uvicorn shuts down on SIGTERM and then re-raises it: -SIGTERM, not -SIGKILL from stop()'s fallback.
    assert code == -signal.SIGTERM
    assert "Traceback" not in log.read_text()
    assert pid_gone(pid)
    assert sim.stop() is None
    assert sim.log_path == str(log) and log.exists()


def test_context_manager_stops_the_process():
    with EmbeddedSimulator(list(FAST)) as sim:
        pid = sim.pid
        assert pid is not None
        assert get(f"{sim.url}/health")[0] == 200
        log_path = sim.log_path
    assert pid_gone(pid)
    os.unlink(log_path)


def test_bad_flag_fails_fast_with_the_simulators_message(tmp_path):
    sim = EmbeddedSimulator(["--max-num-seqs", "0"], log_path=str(tmp_path / "bad.log"))
    t0 = time.monotonic()
    with pytest.raises(SimulatorStartError) as info:
        sim.start()
    assert time.monotonic() - t0 < 10
    message = str(info.value)
    assert "exited with code 2" in message
    assert "--max-num-seqs" in message and "must be a positive integer, got 0" in message
    assert sim.pid is None  # nothing left running


@pytest.mark.slow
def test_simulator_exits_when_its_parent_dies(tmp_path):
    script = (
        "import os, sys\n"
        "from simulator.launcher import EmbeddedSimulator\n"
        f"sim = EmbeddedSimulator({list(FAST)!r}, log_path={str(tmp_path / 'orphan.log')!r})\n"
        "sim.start()\n"
        "print(sim.pid, sim.url, flush=True)\n"
        "os._exit(0)\n"  # die without stopping it
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    pid_text, url = out.stdout.split()
    pid = int(pid_text)
    wait_until(lambda: pid_gone(pid), timeout=5, interval=0.05, what=f"orphaned simulator {pid} to exit")
    with pytest.raises(OSError):
        get(f"{url}/health")


@pytest.mark.slow
def test_headless_locust_run_with_embedded_simulator(tmp_path):
    sim_log = tmp_path / "embedded.log"
    cmd = [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "2", "-r", "2", "-t", "4s",
           "--sim-args", "--step-base-ms 5", "--sim-log", str(sim_log), "--csv", str(tmp_path / "run"),
           "--loglevel", "INFO"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    match = STARTED.search(text)
    assert match, text[-3000:]
    pid = int(match[2])
    assert "stopped the embedded simulator" in text

    with open(tmp_path / "run_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0, rows
    streams = [r for r in rows if r["Name"] not in ("Aggregated", "ttft")]
    assert streams and sum(int(r["Request Count"]) for r in streams) > 0
    assert all(int(r["Failure Count"]) == 0 for r in streams)
    # Server truth: every stream Locust counted reached the simulator's engine.
    added = set(re.findall(r"Added request (\S+)\.", sim_log.read_text()))
    assert len(added) >= sum(int(r["Request Count"]) for r in streams)

    wait_until(lambda: pid_gone(pid), timeout=5, interval=0.05, what=f"embedded simulator {pid} to exit")
    with pytest.raises(OSError):
        get(f"{match[1]}/health")
