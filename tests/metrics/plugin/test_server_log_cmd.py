"""`--server-log-cmd CMD` and `--server-log -` in whole Locust runs against the simulator, whose log is
vLLM-shaped and whose ledger is the truth the log's view is checked against: the command form (with history
replayed first), the stdin form, a command that dies, both options refused together, master/worker mode,
where the master alone runs the command, and the web UI, which cannot set it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from conftest import pid_gone, wait_until
from locust.argument_parser import ui_extra_args_dict
from locust_tools import ROOT, figure, free_port

from stopstorm.metrics.plugin import hooks

SIM = "--step-base-ms 5"
WORK = ["--headless", "-u", "3", "-r", "3", "-t", "4s", "RequestsUser", "--think-time", "0.1",
        "--stop-probability", "1", "--close-mix", "close:1,hold:1", "--hold-seconds", "0.2", "--max-tokens", "200",
        "--ignore-eos", "--loglevel", "INFO"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STOPSTORM_", "LOCUST_"))}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _locust(*args: str, stdin: Any = subprocess.DEVNULL, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "locust", "-f", "locustfile.py", *args], cwd=ROOT, env=_env(),
                          stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          check=False)


def _history(path: Path, n: int) -> None:
    """`n` requests added and aborted an hour before the run, as the simulator (vLLM-shaped) logs them."""
    stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(time.time() - 3600))
    lines = []
    for i in range(n):
        rid = f"chatcmpl-old{i:04d}"
        lines += [f"INFO {stamp}.001 [request_log.py:54] Added request {rid}-0badf00d.",
                  f"INFO {stamp}.002 [request_log.py:54] Aborted request(s) {rid}-0badf00d.",
                  f"INFO {stamp}.002 [request_log.py:54] Request {rid} aborted."]
    path.write_text("\n".join(lines) + "\n")


def _log_agrees_with_the_ledger(doc: dict[str, Any]) -> None:
    """Per cell and overall: the log confirmed exactly the aborts the ledger has, every one it logged."""
    o = doc["overall"]["figures"]
    assert o["aborted"]["source"] == "simulator ledger" and o["log_aborted"]["source"] == "vLLM log"
    assert o["aborted"]["value"] > 0 and o["log_aborted"]["value"] == o["aborted"]["value"], (o["aborted"],
                                                                                              o["log_aborted"])
    for c in doc["cells"]:
        assert c["figures"]["log_aborted"]["value"] == c["figures"]["aborted"]["value"], c
    assert figure(doc, "run", "log_aborts") == figure(doc, "run", "ledger_aborts")


@pytest.mark.slow
def test_a_command_with_history_confirms_every_abort_as_the_ledger_does(tmp_path):
    """`cat history; exec tail -n 0 -F LOG`: the history (stamped an hour ago) is read and dropped, the run's
    lines confirm every abort, and the command is stopped by its PID at the end."""
    sim_log, history, report = tmp_path / "sim.log", tmp_path / "history.log", tmp_path / "r.json"
    _history(history, 5)
    command = f"cat {shlex.quote(str(history))}; exec tail -n 0 -F {shlex.quote(str(sim_log))}"
    proc = _locust(*WORK, "--sim-args", SIM, "--sim-log", str(sim_log), "--server-log-cmd", command,
                   "--stopstorm-report", str(report))
    assert proc.returncode == 0, proc.stdout[-3000:]
    doc = json.loads(report.read_text())
    _log_agrees_with_the_ledger(doc)
    meta = doc["meta"]["server_log"]
    assert meta["source"] == "command" and meta["command"] == command
    assert meta["before_run"] == 5 * 3  # the history's events, one per id a line names
    assert meta["matched"] == meta["events"] > 0  # every event left names one of the run's requests
    assert meta["lines"] >= 5 * 3 + meta["events"] and meta["errors"] == 0, meta
    assert meta["problems"] == [] and meta["exit"]["during_run"] is False and meta["stderr_tail"] == []
    assert pid_gone(meta["pid"])


@pytest.mark.slow
def test_stdin_form(tmp_path):
    """`tail -n 0 -F LOG | locust … --server-log -`: Locust does not read a stdin that is not a terminal."""
    sim_log, report = tmp_path / "sim.log", tmp_path / "r.json"
    sim_log.touch()
    tail = subprocess.Popen(["tail", "-n", "0", "-F", str(sim_log)], stdout=subprocess.PIPE)
    try:
        proc = _locust(*WORK, "--sim-args", SIM, "--sim-log", str(sim_log), "--server-log", "-",
                       "--stopstorm-report", str(report), stdin=tail.stdout)
    finally:
        os.kill(tail.pid, signal.SIGTERM)
        tail.wait(10)
    assert proc.returncode == 0, proc.stdout[-3000:]
    doc = json.loads(report.read_text())
    _log_agrees_with_the_ledger(doc)
    meta = doc["meta"]["server_log"]
    assert meta["source"] == "stdin" and meta["path"] == "-" and meta["command"] is None and meta["problems"] == []


@pytest.mark.slow
def test_a_command_that_dies_is_a_line_in_the_run_and_the_report(tmp_path):
    report = tmp_path / "r.json"
    command = "sleep 1; echo 'error: pod vllm-0 not found' >&2; exit 4"
    proc = _locust(*WORK, "--sim-args", SIM, "--server-log-cmd", command, "--stopstorm-report", str(report))
    assert proc.returncode == 0, proc.stdout[-3000:]  # the run goes on with the truth it still has
    said = [ln for ln in proc.stdout.splitlines() if "exited with code 4" in ln]
    assert len(said) == 1 and "having printed nothing: error: pod vllm-0 not found" in said[0], said
    doc = json.loads(report.read_text())
    meta = doc["meta"]["server_log"]
    assert meta["exit"]["code"] == 4 and meta["exit"]["during_run"] is True and 0.9 < meta["exit"]["after_s"] < 3
    assert meta["stderr_tail"] == ["error: pod vllm-0 not found"] and meta["lines"] == 0
    assert meta["problems"][0] in said[0]
    assert any("named none of this run's" in p for p in meta["problems"])
    assert figure(doc, "overall", "aborted") > 0  # the ledger still says
    assert figure(doc, "overall", "log_aborted") == 0


def test_both_forms_together_are_refused_with_one_line(tmp_path):
    proc = _locust("--headless", "-t", "1s", "--server-log", str(tmp_path / "x.log"), "--server-log-cmd",
                   "tail -F x", timeout=60)
    assert proc.returncode == 2, proc.stdout[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if "--server-log-cmd" in ln]
    assert len(lines) == 1 and lines[0].endswith(
        "stopstorm: --server-log and --server-log-cmd are both given: give one (the command's output is the log)")
    assert "started the embedded simulator" not in proc.stdout


def test_stdin_from_a_terminal_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(isatty=lambda: True))
    with pytest.raises(ValueError, match="standard input is a terminal"):
        hooks._check_server_log(SimpleNamespace(server_log="-", server_log_cmd=""))
    hooks._check_server_log(SimpleNamespace(server_log="vllm.log", server_log_cmd=""))
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(isatty=lambda: False))
    hooks._check_server_log(SimpleNamespace(server_log="-", server_log_cmd=""))


@pytest.mark.slow
def test_distributed_the_master_alone_runs_the_command(sim_pool, tmp_path):
    """Master + two workers, every process given --server-log-cmd (as one environment for every pod would):
    the command runs once, in the master, and its log confirms every abort as the ledger does."""
    sim = sim_pool.fresh("--step-base-ms", "5")
    starts = tmp_path / "starts"
    command = (f"echo $$ >> {shlex.quote(str(starts))}; "
               f"exec tail -n 0 -F {shlex.quote(str(sim.log_path))}")
    env = {**_env(), "STOPSTORM_SERVER_LOG_CMD": command}
    port = str(free_port())
    report = tmp_path / "master.json"
    logs = [tmp_path / n for n in ("master.log", "worker0.log", "worker1.log")]
    common = ["-f", "locustfile.py"]
    cmds = [[*common, *WORK, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
             "--expect-workers", "2", "--host", sim.url, "--stopstorm-report", str(report)],
            [*common, "--worker", "--master-host", "127.0.0.1", "--master-port", port],
            [*common, "--worker", "--master-host", "127.0.0.1", "--master-port", port]]
    procs = [subprocess.Popen([sys.executable, "-m", "locust", *c], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)
             for c, log in zip(cmds, logs, strict=True)]
    deadline = time.monotonic() + 90
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    assert procs[0].returncode == 0, logs[0].read_text()[-3000:]
    doc = json.loads(report.read_text())
    assert "distributed" in doc["meta"]
    _log_agrees_with_the_ledger(doc)
    pids = starts.read_text().split()
    meta = doc["meta"]["server_log"]
    assert pids == [str(meta["pid"])], pids  # once, and it is the master's
    assert meta["problems"] == [] and meta["matched"] == meta["events"] > 0 and pid_gone(meta["pid"])


@pytest.mark.slow
def test_the_web_ui_cannot_set_the_command(tmp_path):
    """Locust's start form may post any option; a shell command from a browser is ignored (and not in the form):
    the command given on the command line runs, once."""
    assert "server_log_cmd" not in ui_extra_args_dict(["-f", "locustfile.py"])
    assert "server_log" in ui_extra_args_dict(["-f", "locustfile.py"])
    marks, report, out = tmp_path / "marks", tmp_path / "r.json", tmp_path / "out.log"
    port = free_port()
    cli = f"echo cli >> {shlex.quote(str(marks))}; exec sleep 60"
    proc = subprocess.Popen([sys.executable, "-m", "locust", "-f", "locustfile.py", "--web-host", "127.0.0.1",
                             "--web-port", str(port), "RequestsUser", "--sim-args", SIM, "--server-log-cmd", cli,
                             "--stopstorm-report", str(report), "--think-time", "0.2", "--max-tokens", "20"],
                            cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, stdout=out.open("wb"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=60, interval=0.1, what="the web UI")
        r = httpx.post(f"{url}/swarm", data={"user_count": "1", "spawn_rate": "1",
                                             "server_log_cmd": f"echo web >> {shlex.quote(str(marks))}"}, timeout=10)
        assert r.status_code == 200 and r.json()["success"], r.text
        wait_until(marks.exists, timeout=10, what="the command")
        time.sleep(1.0)
        httpx.post(f"{url}/stop", timeout=10)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.read_text()
    assert marks.read_text() == "cli\n", text[-3000:]
    assert "ignored --server-log-cmd from the web UI" in text
    # (a web-UI run's report is numbered: the first run's is r-run1.json)
    meta = json.loads((tmp_path / "r-run1.json").read_text())["meta"]["server_log"]
    assert meta["command"] == cli and pid_gone(meta["pid"])
