"""Secrets never written: the API key a server echoes and a password in `--host` are not in any record, report,
log line or console output (metrics/redact.py, sealed into every record by users/core.seal)."""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from locust_tools import records, run_locust

from stopstorm.metrics import redact
from stopstorm.metrics.record import INTERRUPTED

KEY = "sk-secret-test-9f8e7d6c5b4a"
PASSWORD = "pw-hunter2-xyzzy"


def test_a_registered_secret_a_bearer_token_a_basic_token_and_userinfo_are_masked():
    redact.add_secret(KEY)
    text = (f"HTTP 401: Incorrect API key provided: Bearer {KEY}. key={KEY}; other Bearer abc.def-123 "
            "Basic YWxpY2U6cGFzc3dvcmQ= at http://alice:secret@host:8000/v1 (basic auth failed)")
    out = redact.redact(text)
    assert KEY not in out and "abc.def-123" not in out and "YWxpY2U6" not in out and "alice:secret" not in out
    assert out == ("HTTP 401: Incorrect API key provided: Bearer ***. key=***; other Bearer *** Basic *** at "
                   "http://host:8000/v1 (basic auth failed)")


def test_a_short_secret_is_masked_only_where_it_stands_alone():
    redact.add_secret("abc")
    assert redact.redact("key abc, not abcdef or xabc") == "key ***, not abcdef or xabc"


def test_urls_lose_their_userinfo():
    assert redact.redact_url("http://u:p@127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert redact.redact_url("https://token@host/x?y=1") == "https://host/x?y=1"
    assert redact.redact_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"


def test_the_log_filter_masks_every_line(caplog: pytest.LogCaptureFixture):
    redact.add_secret(KEY)
    handler = logging.StreamHandler()
    logging.getLogger().addHandler(handler)
    try:
        redact.install_log_filter()
        record = logging.LogRecord("stopstorm", logging.ERROR, __file__, 1, "failed with %s", (KEY,), None)
        assert all(f.filter(record) for f in handler.filters)
        assert KEY not in record.getMessage() and "***" in record.getMessage()
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hostile_server.py")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().split()[-1]
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_run_writes_neither_the_echoed_key_nor_the_hosts_password(tmp_path: Path, hostile: str):
    host = hostile.replace("http://", f"http://alice:{PASSWORD}@") + "/b/status-401-echo-key/v1"
    run = run_locust(tmp_path, "--host", host, "--api-key", KEY, "-u", "2", "-r", "2", "-t", "2s",
                     "--think-time", "0.1", timeout=90)
    text = run.stdout + run.stderr
    assert run.returncode == 1, text[-3000:]  # every stream failed: HTTP 401
    report = (tmp_path / "report.json").read_text()
    recs = records(tmp_path / "records.jsonl")
    failed = [r for r in recs if r["error"] != INTERRUPTED]
    assert failed and all(r["error"].startswith("HTTP 401: Incorrect API key provided: Bearer ***") for r in failed)
    for where, content in (("output", text), ("report", report), ("records", json.dumps(recs))):
        assert KEY not in content, where
        assert PASSWORD not in content and "alice:" not in content, where
    assert json.loads(report)["meta"]["host"] == hostile + "/b/status-401-echo-key"
