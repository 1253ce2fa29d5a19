"""Test tools for whole runs: a headless `locust` subprocess against a simulator process we start ourselves (on
a port we pick, so it can be killed and restarted there), and the three truths a run leaves: the simulator's
ledger, the JSONL of stream records and the report.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from conftest import ROOT, ledger_by_id, pid_gone, wait_until

from stopstorm.simulator.launcher import READY_PREFIX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SimProcess:
    """`python -m stopstorm.simulator` on a fixed loopback port: started, killed (SIGKILL, by PID), restarted there."""

    def __init__(self, port: int, args: list[str], log: Path) -> None:
        self.port = port
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> SimProcess:
        out = self.log.open("a")
        cmd = [sys.executable, "-m", "stopstorm.simulator", "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=out, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith(READY_PREFIX), f"simulator did not start: {line!r}"
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            wait_until(lambda: pid_gone(self.proc.pid), timeout=5, what="killed simulator")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def ledger(self) -> dict[str, dict[str, Any]]:
        r = httpx.get(f"{self.url}/stopstorm/ledger", timeout=10)
        r.raise_for_status()
        return ledger_by_id(r.json())


def locust_cmd(out: Path, *args: str) -> list[str]:
    """A headless locust run writing its report, JSONL and CSV under `out`."""
    return [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "--loglevel", "INFO",
            "--stopstorm-report", str(out / "report.json"), "--stopstorm-records", str(out / "records.jsonl"),
            "--csv", str(out / "run"), *args]


def run_locust(out: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(locust_cmd(out, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def records(path: Path) -> list[dict[str, Any]]:
    """Every JSONL line, each a whole JSON object (a torn last line would fail here)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def server_id(record: dict[str, Any]) -> str:
    return ("chatcmpl-" if record["endpoint"] == "chat" else "cmpl-") + record["request_id"]


def figure(report: dict[str, Any], section: str, name: str) -> Any:
    return report[section]["figures"][name]["value"]
