"""The run survives what breaks under it and loses nothing: a server killed and restarted mid-run, a run killed
by SIGTERM or Ctrl-C (a readable report that says it is partial), and bad configuration refused before any
load with the option named.
"""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    # conftest.py imported httpx (and so ssl) before us; a locustfile imports locust first and never sees this.
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (users.options imports it: gevent monkey-patches the process, as under Locust)

import argparse
import http.server
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST, wait_until
from locust_tools import ROOT, SimProcess, figure, free_port, locust_cmd, records, server_id
from stream_tools import make_settings

from stopstorm.metrics.record import INTERRUPTED
from stopstorm.users.options import build_settings
from stopstorm.users.policy import StopPlan
from stopstorm.users.preflight import check_server

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


# --- the server dies and comes back -----------------------------------------------------------------------------


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run_is_recorded_and_the_run_goes_on(tmp_path):
    sim = SimProcess(free_port(), [*FAST, "--max-num-seqs", "16"], tmp_path / "simulator.log").start()
    proc = subprocess.Popen(
        locust_cmd(tmp_path, "--host", sim.url, "-u", "6", "-r", "6", "-t", "9s", "--max-tokens", "40",
                   "--ignore-eos", "--think-time", "0.05", "--connect-timeout", "2"),
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        jsonl = tmp_path / "records.jsonl"
        wait_until(lambda: _lines(jsonl) >= 10, timeout=30, interval=0.05, what="10 streams before the kill")
        before = sim.ledger()
        killed = time.monotonic()
        sim.kill()
        time.sleep(1.5)
        restarted = time.monotonic()
        sim.start()
        output, _ = proc.communicate(timeout=90)
        after = sim.ledger()
    finally:
        if proc.poll() is None:
            proc.kill()
        sim.stop()
    assert proc.returncode == 1, output[-3000:]  # failures, no crash
    assert "Traceback" not in output, output[-3000:]
    recs = {server_id(r): r for r in records(tmp_path / "records.jsonl")}
    # Nothing lost: every request either server saw is a record (the first one's as of just before its death).
    assert not [rid for rid in (*before, *after) if rid not in recs]
    down = [r for r in recs.values() if killed < r["sent"] < restarted - 0.1]
    assert down and all(r["error"] is not None for r in down), [r["error"] for r in down]
    causes = {r["error"] for r in down}
    assert all(re.match(r"^(connection error|stream cut off|interrupted)", c) for c in causes), causes
    # Streams being read when the server died (not already stopped by their user, not completed just before).
    cut = [r for rid, r in recs.items()
           if rid in before and before[rid]["freed"] is None and r["stop"] is None and not r["done"]]
    assert cut and all(r["error"] and r["error"].startswith("stream cut off") for r in cut if r["error"] != INTERRUPTED)
    later = [r for r in recs.values() if r["sent"] > restarted + 0.5]
    assert sum(1 for r in later if r["error"] is None) >= 5, [r["error"] for r in later]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["partial"] is False
    assert figure(report, "overall", "streams") == len(recs)
    assert figure(report, "run", "unmatched_requests") == 0  # against the restarted server's ledger
    assert report["meta"]["metrics"]["errors"] >= 1  # /metrics was down too, and that was counted


# --- the run is killed -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_run_writes_a_readable_partial_report(tmp_path, sig):
    proc = subprocess.Popen(
        locust_cmd(tmp_path, "-u", "4", "-r", "4", "-t", "60s", "--max-tokens", "30", "--think-time", "0.05",
                   "--sim-args", " ".join(FAST)),
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: _lines(tmp_path / "records.jsonl") >= 8, timeout=60, interval=0.05, what="8 streams")
        sent = time.monotonic()
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - sent < 30, "the run did not stop soon after the signal"
    report = json.loads((tmp_path / "report.json").read_text())  # whole JSON: written atomically
    meta = report["meta"]
    assert meta["partial"] is True and sig.name.split("SIG")[1] in meta["partial_reason"], meta
    assert "PARTIAL report" in output, output[-3000:]
    recs = records(tmp_path / "records.jsonl")
    assert meta["records"]["written"] == len(recs) == figure(report, "overall", "streams") >= 8
    assert figure(report, "run", "unmatched_requests") == 0  # streams cut by the signal are recorded too
    assert meta["duration_s"] < 30


# --- bad configuration -------------------------------------------------------------------------------------------


_OPTIONS: dict[str, Any] = {
    "endpoint": "chat", "model": "", "prompts": "", "max_tokens": 16, "temperature": 0.0, "ignore_eos": False,
    "no_usage": False, "no_continuous_usage": False, "api_key": "", "stop_probability": 0.5,
    "stop_at": "tokens:uniform:1:8", "close_mix": "close:1", "hold_seconds": 1.0, "think_time": 0.0,
    "read_timeout": 30.0, "connect_timeout": 2.0, "headers_timeout": 30.0,
}


@pytest.mark.parametrize(("change", "words"), [
    ({"stop_probability": 1.5}, "--stop-probability must be within [0, 1]"),
    ({"stop_at": "tokens:gauss:3"}, "--stop-at"),
    ({"close_mix": "slam:1"}, "--close-mix: unknown close mode 'slam'; choose from close, drop, hold, none"),
    ({"connect_timeout": 0.0}, "--connect-timeout must be > 0"),
    ({"headers_timeout": -1.0}, "--headers-timeout must be > 0"),
    ({"max_tokens": 0}, "--max-tokens must be at least 1"),
])
def test_bad_options_are_refused_naming_the_option(change, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        build_settings(argparse.Namespace(**{**_OPTIONS, **change}), "http://127.0.0.1:9")


@pytest.mark.parametrize(("host", "words"), [
    ("127.0.0.1:8000", "--host '127.0.0.1:8000': not a valid URL"),
    ("ftp://127.0.0.1", "scheme http or https"),
    ("http://", "not a valid URL"),
    ("http://127.0.0.1:99999", "not a valid URL"),
])
def test_a_bad_url_is_refused(host, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        check_server(host, None)


def test_an_unreachable_host_is_refused_within_seconds():
    port = free_port()  # closed: nothing listens there
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"--host http://127.0.0.1:{port}: cannot connect"):
        check_server(f"http://127.0.0.1:{port}", None, connect_timeout=2.0)
    assert time.monotonic() - started < 2.5


@pytest.fixture
def web_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain static file server on loopback: a real HTTP server that is not OpenAI-compatible."""
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_without_v1_models_is_refused(web_root):
    url, _ = web_root
    with pytest.raises(ValueError, match=r"not an OpenAI-compatible server: GET /v1/models answered HTTP 404"):
        check_server(url, None)


def test_a_server_with_the_wrong_model_list_shape_is_refused(web_root):
    url, root = web_root
    (root / "v1").mkdir()
    (root / "v1" / "models").write_text('{"models": ["llm"]}')
    with pytest.raises(ValueError, match=r"not an OpenAI-compatible server: GET /v1/models is not"):
        check_server(url, None)


def test_a_model_the_server_does_not_serve_is_refused(sim_pool):
    sim = sim_pool.get(*FAST)
    with pytest.raises(ValueError, match=r"--model 'gpt-x': .* serves 'llm'"):
        build_settings(argparse.Namespace(**{**_OPTIONS, "model": "gpt-x"}), sim.url, check=True)


@pytest.mark.slow
def test_an_unreachable_host_is_recorded_and_the_run_goes_on_until_it_answers(tmp_path):
    """A server that cannot be reached is its state, not a typo: one warning, every stream that fails recorded
    as a connection error, the report written. Without --model the requests ask the server for its model until
    it answers, so once it comes up (here mid-run, on the port the run was given) streams go through, each in
    the server's ledger."""
    port = free_port()
    proc = subprocess.Popen(
        locust_cmd(tmp_path, "--host", f"http://127.0.0.1:{port}", "-u", "2", "-r", "2", "-t", "8s",
                   "--max-tokens", "8", "--think-time", "0.1", "--connect-timeout", "2", "RequestsUser", "HttpxUser"),
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sim = SimProcess(port, list(FAST), tmp_path / "simulator.log")
    try:
        jsonl = tmp_path / "records.jsonl"
        wait_until(lambda: _lines(jsonl) >= 4, timeout=30, interval=0.05, what="4 failed streams before the server")
        sim.start()
        up = time.monotonic()  # the server answers from here
        output, _ = proc.communicate(timeout=90)
        ledger = sim.ledger()
    finally:
        if proc.poll() is None:
            proc.kill()
        sim.stop()
    assert proc.returncode == 1, output[-3000:]  # Locust's own status: requests failed; no crash, no refusal
    assert "Traceback" not in output, output[-3000:]
    assert f"--host http://127.0.0.1:{port}: cannot connect" in output and "the run goes on" in output
    assert "the server answers now; model 'llm'" in output
    recs = records(tmp_path / "records.jsonl")
    failed = [r for r in recs if r["error"] is not None and r["error"] != INTERRUPTED]
    served = [r for r in recs if r["error"] is None]
    assert len(failed) >= 4 and all(r["error"].startswith("connection error") for r in failed), [
        r["error"] for r in failed]
    assert all(r["sent"] < up for r in failed)  # only while nothing listened: no stream after went without a model
    assert len(served) >= 4 and all(server_id(r) in ledger for r in served)  # the model found: the server took them
    assert set(ledger) <= {server_id(r) for r in recs}  # and nothing else reached it
    report = json.loads((tmp_path / "report.json").read_text())
    assert figure(report, "overall", "failed") == len(failed) and figure(report, "overall", "streams") == len(recs)
    assert any(c.startswith(f"Caveat: {len(failed)} of {len(recs)} streams failed")
               for c in report["verdict"]["caveats"])


@pytest.mark.parametrize("stack", ["requests", "httpx", "httpx-async", "openai", "openai-async"])
def test_a_connect_that_times_out_is_a_connection_error(stack: str) -> None:
    """A server whose accept queue is full drops the SYN, and the connect times out: the server was not reached,
    so it is a connection error, as a refused connect is, naming the connect timeout (before 2026-12-06 these
    stacks called it "timeout: no byte for <read timeout> s", a silent server's words). fasthttp's
    geventhttpclient raises the same TimeoutError for both and keeps its words."""
    import socket

    from stopstorm.users.single import SingleStreams

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # one pending connection fills the queue (Linux), and is never accepted
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    streams = SingleStreams()
    try:
        record = streams.run(stack, make_settings(f"http://127.0.0.1:{port}", connect_timeout=0.5, model="llm"),
                             "close", StopPlan())
    finally:
        streams.close()
        filler.close()
        listener.close()
    assert record.error is not None and record.error.startswith("connection error: connect timed out"), record.error
    assert record.first_token is None and record.tokens == 0
