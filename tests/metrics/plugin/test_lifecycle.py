"""Every way a run ends leaves its report: headless `-t`; the web UI's Stop and its run time, twice in one
process; Ctrl-C to the whole process group; two SIGTERMs; a worker killed. Each report must exist, be whole (one
JSON document, its HTML beside it), carry server truth (the simulator's ledger read: the embedded simulator was
still alive) and be partial exactly when the run was cut short; the exit status says which it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FAST, wait_until
from locust_tools import ROOT, figure, free_port, locust_cmd, records

from stopstorm.metrics.analysis.thresholds import EXIT_THRESHOLD_BROKEN
from stopstorm.metrics.plugin.signals import EXIT_CUT_SHORT
from stopstorm.metrics.record import INTERRUPTED

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
LOAD = ("-u", "4", "-r", "4", "--max-tokens", "30", "--think-time", "0.05", "--sim-args", " ".join(FAST))
LEDGER = "simulator ledger"


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def _whole(path: Path) -> dict[str, Any]:
    """The report: one JSON document (written atomically), its HTML page beside it, no temp file left."""
    doc = json.loads(path.read_text())
    assert path.with_suffix(".html").read_text().rstrip().endswith("</html>")
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    return doc


def _truthful(doc: dict[str, Any], jsonl: Path) -> None:
    """Server truth was read, and every stream the clients reported is in it (and the other way round)."""
    assert LEDGER in doc["sources"], doc["sources"]
    assert figure(doc, "run", "unmatched_requests") == 0
    # A stream the ledger does not know never reached the server: a user killed by the run's end before it sent.
    unsent = [r for r in records(jsonl) if r["error"] == INTERRUPTED and r["headers"] is None]
    assert figure(doc, "run", "unjoined_streams") <= len(unsent), [r["error"] for r in records(jsonl) if r["error"]]
    assert figure(doc, "overall", "streams") == len(records(jsonl)) == doc["meta"]["records"]["written"] > 0
    assert figure(doc, "overall", "queue_wait")["count"] > 0


def _signalled(tmp_path: Path, send: Any, extra: tuple[str, ...] = (),
               env: dict[str, str] = ENV) -> tuple[subprocess.CompletedProcess[str], float]:
    """A 60 s run in a session of its own (as a terminal's foreground job), signalled by `send(pid)` once it has
    8 streams; its result and how long it took to end after the signal."""
    proc = subprocess.Popen(locust_cmd(tmp_path, *LOAD, "-t", "60s", *extra), cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: _lines(tmp_path / "records.jsonl") >= 8, timeout=60, interval=0.05, what="8 streams")
        sent = time.monotonic()
        send(proc.pid)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, ""), time.monotonic() - sent


@pytest.mark.slow
def test_headless_run_time_writes_a_whole_report_that_is_not_partial(tmp_path):
    out = subprocess.run(locust_cmd(tmp_path, *LOAD, "-t", "4s", "--fail-on", "failed_ratio>0.5"), cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    doc = _whole(tmp_path / "report.json")
    assert doc["meta"]["partial"] is False and doc["meta"].get("partial_reason") is None
    _truthful(doc, tmp_path / "records.jsonl")
    assert doc["thresholds"] == [{"expr": "failed_ratio>0.5", "value": 0.0, "held": True, "note": None}]
    assert "stopstorm thresholds: all 1 held" in text and "PARTIAL" not in text


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_keeps_the_simulator_and_the_report(tmp_path):
    """The simulator is in a session of its own: the group's SIGINT does not reach it, so the report still reads
    its ledger; no KeyboardInterrupt traceback; the exit status says the run was cut short."""
    out, took = _signalled(tmp_path, lambda pid: os.killpg(pid, signal.SIGINT), ("--fail-on", "streams<0"))
    assert out.returncode == EXIT_CUT_SHORT, out.stdout[-3000:]
    assert took < 30, "the run did not end soon after Ctrl-C"
    assert "Traceback" not in out.stdout and "KeyboardInterrupt" not in out.stdout, out.stdout[-3000:]
    doc = _whole(tmp_path / "report.json")
    assert doc["meta"]["partial"] is True and "SIGINT (Ctrl-C)" in doc["meta"]["partial_reason"]
    _truthful(doc, tmp_path / "records.jsonl")
    assert "PARTIAL report (SIGINT (Ctrl-C)" in out.stdout
    assert "stopped the embedded simulator (exit status -15)" in out.stdout  # alive until the end, stopped by PID


@pytest.mark.slow
def test_two_sigterms_still_write_the_report_once(tmp_path):
    def twice(pid: int) -> None:
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)

    out, _ = _signalled(tmp_path, twice)
    assert out.returncode == EXIT_CUT_SHORT, out.stdout[-3000:]
    assert "already shutting down" in out.stdout and "Traceback" not in out.stdout, out.stdout[-3000:]
    assert out.stdout.count("Response time percentiles") == 1  # one shutdown, not Locust's two
    assert out.stdout.count("stopstorm abort accounting") == 1
    doc = _whole(tmp_path / "report.json")
    assert doc["meta"]["partial"] is True and "SIGTERM" in doc["meta"]["partial_reason"]
    _truthful(doc, tmp_path / "records.jsonl")


@pytest.mark.slow
def test_a_third_signal_exits_at_once_and_says_what_is_lost(tmp_path):
    """It exits at once, the simulator killed by PID; what it leaves in the temp folder (the ledger entries
    drained so far: with the embedded simulator, their only copy) is named in its last line, and nothing else
    is left there."""
    def thrice(pid: int) -> None:
        time.sleep(2.5)  # past the drain's first read, so its spool holds entries
        for _ in range(3):
            os.kill(pid, signal.SIGINT)
            time.sleep(0.01)

    temp = tmp_path / "tmp"
    temp.mkdir()
    out, took = _signalled(tmp_path, thrice, env={**ENV, "TMPDIR": str(temp)})
    assert out.returncode == EXIT_CUT_SHORT and took < 10, out.stdout[-3000:]
    said = [line for line in out.stdout.splitlines() if "third signal: exiting now" in line]
    assert said and "lost: " in said[0], out.stdout[-3000:]
    left = sorted(temp.iterdir())
    logs = [p for p in left if p.name.startswith("stopstorm-simulator-")]  # the simulator's log, named at its start
    assert all(f"its log: {p}" in out.stdout for p in logs), (logs, out.stdout[-3000:])
    spools = [(p.name, p.stat().st_size) for p in left if p not in logs]
    assert all(str(temp / name) in said[0] and size > 0 for name, size in spools), (spools, said[0])
    if "report (JSON, HTML and summary, not written)" in said[0]:  # the signal came before the report was
        assert [name for name, _size in spools if name.startswith("stopstorm-ledger-")], (spools, said[0])
    sim = [line for line in out.stdout.splitlines() if "started the embedded simulator" in line]
    pid = int(sim[0].split("(pid ")[1].split(",")[0])
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
               timeout=10, what="the simulator killed by the forced exit")


def _form(**values: Any) -> dict[str, str]:
    return {k: str(v) for k, v in values.items()}


@pytest.mark.slow
def test_two_web_ui_runs_in_one_process_each_get_their_own_whole_report(tmp_path):
    """Run 1 ends by the form's run time, run 2 by Stop: each starts from zero, gets its numbered files, is not
    partial, and is linked from the UI; SIGTERM with no run going cuts nothing short."""
    port = free_port()
    cmd = [sys.executable, "-m", "locust", "-f", "locustfile.py", "--web-host", "127.0.0.1", "--web-port",
           str(port), "--stopstorm-report", str(tmp_path / "report.json"), "--stopstorm-records",
           str(tmp_path / "records.jsonl"), "--max-tokens", "30", "--think-time", "0.05", "--sim-args",
           " ".join(FAST), "--fail-on", "failed_ratio>0.5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ui = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{ui}/"), timeout=60, interval=0.2, what="the web UI")
        assert httpx.get(f"{ui}/stopstorm/report").status_code == 404  # no run yet
        r = httpx.post(f"{ui}/swarm", data=_form(user_count=4, spawn_rate=4, run_time="3s"), timeout=10)
        assert r.json()["success"], r.text
        first = tmp_path / "report-run1.json"
        wait_until(first.exists, timeout=60, interval=0.1, what="run 1's report")
        r = httpx.post(f"{ui}/swarm", data=_form(user_count=4, spawn_rate=4), timeout=10)
        assert r.json()["success"], r.text
        wait_until(lambda: _lines(tmp_path / "records-run2.jsonl") >= 8, timeout=60, interval=0.05,
                   what="8 streams in run 2")
        assert httpx.post(f"{ui}/stop", timeout=60).json()["success"]
        second = tmp_path / "report-run2.json"
        wait_until(second.exists, timeout=60, interval=0.1, what="run 2's report")
        latest = httpx.get(f"{ui}/stopstorm/report", timeout=10)
        listing = httpx.get(f"{ui}/stopstorm/reports", timeout=10).text
        one = httpx.get(f"{ui}/stopstorm/report/1.json", timeout=10).json()
        page = httpx.get(f"{ui}/", timeout=10).text
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-3000:]  # the signal came with no run going: nothing was cut short
    docs = [_whole(first), _whole(second)]
    for n, doc in enumerate(docs, 1):
        assert doc["meta"]["partial"] is False, doc["meta"]
        _truthful(doc, tmp_path / f"records-run{n}.jsonl")  # run 2 from zero: only its own streams and requests
        assert doc["thresholds"][0]["held"] is True
        # …and its own self-monitor: the TTFT stamps it checked are this run's, its loop watched for this run
        monitor = doc["self_monitor"]["local"]
        timed = [r for r in records(tmp_path / f"records-run{n}.jsonl") if r["first_token"] is not None]
        kernel = [r for r in timed if r["stamp_clock"] == "kernel"]  # checked too, and counted
        assert monitor["ttft"]["checked"] == len(timed) > 0, (n, monitor["ttft"], len(timed))
        assert monitor["ttft"]["kernel"] == len(kernel), (n, monitor["ttft"], len(kernel))
        assert monitor["wall_s"] <= doc["meta"]["duration_s"] + 1.0, (n, monitor["wall_s"], doc["meta"]["duration_s"])
    # GPU sampling is per run too: run 2 says what run 1 said (no NVML on this machine), not "first run only"
    assert docs[1]["meta"].get("gpu") == docs[0]["meta"].get("gpu"), (docs[0]["meta"], docs[1]["meta"])
    assert docs[1]["meta"]["started_at"] > docs[0]["meta"]["started_at"] + docs[0]["meta"]["duration_s"]
    assert 2.5 < docs[0]["meta"]["duration_s"] < 10  # the form's run time ended run 1
    assert not (tmp_path / "report-run3.json").exists() and not (tmp_path / "report.json").exists()
    assert latest.status_code == 200 and "report-run2.json" in latest.text
    assert "report-run1" in listing and "report-run2" in listing
    assert one["meta"]["started_at"] == docs[0]["meta"]["started_at"]
    assert "./stopstorm/report" in page  # the Download data tab's link
    assert "stopstorm run 1:" in output and "stopstorm run 2:" in output and "Traceback" not in output


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_a_killed_worker_and_a_broken_threshold_on_the_master(sim_pool, tmp_path):
    """Master and two workers; one worker SIGKILLed mid-run. The master's report is whole, not partial (the run
    reached its -t), names the dead worker, and its broken threshold sets the exit status."""
    sim = sim_pool.fresh(*FAST, "--max-num-seqs", "8")
    port = str(free_port())
    report = tmp_path / "master.json"
    master = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "--master", "--master-bind-host",
         "127.0.0.1", "--master-bind-port", port, "--expect-workers", "2", "--host", sim.url, "-u", "4", "-r", "4",
         "-t", "6s", "--max-tokens", "30", "--think-time", "0.05", "--stopstorm-report", str(report),
         "--fail-on", "streams>0", "--fail-on", "failed_ratio>0.5", "--only-summary"],
        cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    workers = [subprocess.Popen([sys.executable, "-m", "locust", "-f", "locustfile.py", "--worker", "--master-host",
                                 "127.0.0.1", "--master-port", port], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        wait_until(lambda: len(sim.entries()) >= 4, timeout=60, interval=0.05, what="the first requests")
        time.sleep(1.0)
        os.kill(workers[0].pid, signal.SIGKILL)
        output, _ = master.communicate(timeout=120)
    finally:
        for p in (master, *workers):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert master.returncode == EXIT_THRESHOLD_BROKEN, output[-3000:]
    doc = _whole(report)
    assert doc["meta"]["partial"] is False
    assert LEDGER in doc["sources"] and figure(doc, "overall", "streams") > 0
    assert len(doc["meta"]["distributed"]["incomplete"]) == 1  # the killed worker, named
    assert [t["held"] for t in doc["thresholds"]] == [False, True]
    assert "BROKEN  streams>0" in output and "held    failed_ratio>0.5" in output


# --- the pieces, without a run -------------------------------------------------------------------------------


def test_a_web_ui_run_numbers_its_files_and_a_headless_one_keeps_the_path():
    from stopstorm.metrics.plugin.hooks import run_path

    assert run_path("out/stopstorm-report.json", 1, web_ui=False) == Path("out/stopstorm-report.json")
    assert run_path("out/stopstorm-report.json", 3, web_ui=True) == Path("out/stopstorm-report-run3.json")
    assert run_path("records.jsonl", 1, web_ui=True) == Path("records-run1.jsonl")


def test_a_later_run_reads_only_its_own_requests_from_the_ledger():
    from stopstorm.metrics.plugin.hooks import _this_run
    from stopstorm.metrics.truth.ledger import LedgerSnapshot

    def entry(rid: str, arrival: float) -> dict[str, Any]:
        return {"request_id": rid, "endpoint": "chat", "stream": True, "prompt_tokens": 1, "max_tokens": 4,
                "target_tokens": 4, "arrival": arrival, "freed": arrival + 1}

    snapshot = LedgerSnapshot.from_json({"now": 50.0, "requests": [entry("old", 10.0), entry("new", 30.0)]})
    assert [e.request_id for e in _this_run(snapshot, None).entries] == ["old", "new"]  # a process's first run
    assert [e.request_id for e in _this_run(snapshot, 20.0).entries] == ["new"]  # after run 1's reading at 20


def test_a_signal_cuts_a_run_short_only_before_its_end_began(monkeypatch):
    from stopstorm.metrics.plugin import signals

    assert signals.stop_reason() is None or signals.first_signal() is not None
    monkeypatch.setattr(signals._STATE, "received", [("SIGTERM", 100.0, 1_700_000_000.0)])
    assert "SIGTERM received" in (signals.stop_reason(before=None) or "")
    assert "SIGTERM received" in (signals.stop_reason(before=101.0) or "")  # the run was still going
    assert signals.stop_reason(before=99.0) is None  # its -t had already ended it


def test_a_report_whose_html_page_has_a_directory_in_its_place_is_refused_before_load(tmp_path):
    from stopstorm.metrics.plugin.hooks import _check_report_path

    (tmp_path / "r.html").mkdir()
    with pytest.raises(ValueError, match=r"--stopstorm-report .*r\.json: its HTML page .*r\.html would go where a "
                                         r"directory is"):
        _check_report_path(str(tmp_path / "r.json"))
    _check_report_path(str(tmp_path / "other.json"))  # a free place passes
