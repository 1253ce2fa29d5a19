"""The README's security claims, against a server that records what it was sent (tests/recording_server.py):

- every client stack sends `--api-key` as `Authorization: Bearer <key>` (the start-up check too), and the key
  is written nowhere: not to stdout or stderr, the `--logfile`, the report's JSON or HTML, the CSV files, the
  `--stopstorm-records` JSONL, nor the web UI's page (Locust's form marks the option secret);
- TLS is verified by default: a self-signed certificate on loopback is refused by every stack (its record's
  failure names the certificate verification) and by the start-up check (the run stops before any load,
  naming the option to use), and accepted with `--insecure`, by every stack in a whole run.

The runs are real `locust -f locustfile.py` subprocesses; the per-stack TLS refusals run one stream through
each stack's own transport (users/single.py, the users' path), in this process, patched by gevent as a
locustfile's is.
"""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    # conftest.py imported httpx (and so ssl) before us; a locustfile imports locust first and never sees this.
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (gevent monkey-patches the process, as under Locust)

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, wait_until
from locust_tools import free_port, records, run_locust
from stream_tools import make_settings

from stopstorm.users.policy import StopPlan
from stopstorm.users.single import SingleStreams
from stopstorm.users.stacks import STACKS, is_async

KEY = "sk-stopstorm-canary-7Qx2Vb9LmZ4"  # distinctive: found in any text only if it leaked
CLASSES = [cls.__name__ for cls in STACKS.values()]
# What each library says when it refuses an untrusted certificate (ssl's CERTIFICATE_VERIFY_FAILED, as
# requests, httpx, httpx2 and geventhttpclient each word it in the record's failure).
CERT_REFUSED = ("certificate verify failed", "CERTIFICATE_VERIFY_FAILED", "self-signed certificate",
                "self signed certificate")


class Recorder:
    """tests/recording_server.py in its own process: its URL, and what it received."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "recording_server.py"), *args],
                                     cwd=ROOT / "tests", stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().split()[-1]
        assert self.url.startswith(("http://127.0.0.1:", "https://127.0.0.1:")), self.url

    def received(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/_received", verify=False, timeout=10)
        r.raise_for_status()
        return dict(r.json())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def plain() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.stop()


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with Debian's openssl (kept in the test's tmp dir)."""
    openssl = shutil.which("openssl")
    assert openssl, "the TLS tests need the openssl command (Debian's openssl package)"
    d = tmp_path_factory.mktemp("tls")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def tls(cert: tuple[Path, Path]) -> Iterator[Recorder]:
    rec = Recorder("--tls", str(cert[0]), str(cert[1]))
    yield rec
    rec.stop()


def _no_trust_env() -> dict[str, str]:
    """The environment without anything that would make a library trust our certificate."""
    return {k: v for k, v in os.environ.items()
            if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")}


# --- the API key --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_run(plain: Recorder, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One headless run of all six stacks (six users: one of each class) with --api-key."""
    out = tmp_path_factory.mktemp("key")
    run = run_locust(out, "--host", plain.url, "--api-key", KEY, "-u", "6", "-r", "6", "-t", "3s",
                     "--think-time", "0.2", "--stop-probability", "0", "--logfile", str(out / "locust.log"),
                     *CLASSES, timeout=120)
    return {"out": out, "run": run, "received": plain.received()["requests"],
            "records": records(out / "records.jsonl")}


def test_every_stack_sends_the_key_as_a_bearer_token(key_run: dict[str, Any]) -> None:
    run = key_run["run"]
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    by_id = {r["request_id"]: r["stack"] for r in key_run["records"]}
    posts = [r for r in key_run["received"] if r["method"] == "POST"]
    sent_by: dict[str, list[str]] = {}
    for r in posts:
        assert r["request_id"] in by_id, r  # every request the server saw is one of the run's streams
        sent_by.setdefault(by_id[r["request_id"]], []).append(r["authorization"])
    assert set(sent_by) == set(STACKS), sent_by.keys()
    for stack, auths in sent_by.items():
        assert auths and all(a == f"Bearer {KEY}" for a in auths), (stack, {a[:12] for a in auths})
    checks = [r for r in key_run["received"] if r["method"] == "GET" and r["path"] == "/v1/models"]
    assert checks and all(r["authorization"] == f"Bearer {KEY}" for r in checks)  # the start-up check's


def test_the_key_is_written_nowhere(key_run: dict[str, Any]) -> None:
    out: Path = key_run["out"]
    run = key_run["run"]
    files = sorted(p for p in out.iterdir() if p.is_file())
    names = {p.name for p in files}
    assert {"report.json", "report.html", "records.jsonl", "locust.log"} <= names, names
    assert any(n.endswith(".csv") for n in names), names
    for where, text in [("stdout", run.stdout), ("stderr", run.stderr),
                        *((p.name, p.read_text(errors="replace")) for p in files)]:
        assert KEY not in text, f"the API key is in {where}"
        assert KEY[-12:] not in text, f"part of the API key is in {where}"
    assert "stopstorm" in (out / "locust.log").read_text()  # the log file is the run's, not empty


def test_the_web_ui_marks_the_key_secret_never_shows_it_and_keeps_it_through_an_empty_field(
        plain: Recorder, tmp_path: Path) -> None:
    """The page Locust serves carries no part of the key (it filled the masked field with it: checked by taking
    `install_secret_fields` out, which fails here), and a run started from the form with the field left empty,
    as the page now gives it, still sends the key the process started with."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "locust", "-f", "locustfile.py", "--host", plain.url, "--api-key", KEY,
           "--web-host", "127.0.0.1", "--web-port", str(port), "--stopstorm-report", str(tmp_path / "r.json"),
           "--think-time", "0.2", "--stop-probability", "0", "RequestsUser"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def page() -> str | None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
            except httpx.HTTPError:
                return None
            return r.text if r.status_code == 200 else None

        html = wait_until(page, timeout=60, what="the web UI's page")
        assert 'extra_options' in html or 'extraOptions' in html, html[:2000]
        assert KEY not in html and KEY[-12:] not in html, "the API key is in the web UI's page"
        start = html.index("templateArgs") if "templateArgs" in html else 0
        args_text = html[start:]
        assert '"api_key"' in args_text
        entry = args_text[args_text.index('"api_key"'):]
        assert '"is_secret": true' in entry[:600], entry[:600]  # Locust draws it as a masked password input
        assert '"default_value": ""' in entry[:600], entry[:600]

        before = {r["request_id"] for r in plain.received()["requests"]}
        started = httpx.post(f"http://127.0.0.1:{port}/swarm", timeout=10, data={
            "user_count": "1", "spawn_rate": "1", "host": plain.url, "run_time": "2s", "api_key": ""})
        assert started.json()["success"] is True, started.text

        def posts() -> list[dict[str, Any]] | None:
            new = [r for r in plain.received()["requests"]
                   if r["method"] == "POST" and r["request_id"] not in before]
            return new or None

        sent = wait_until(posts, timeout=30, what="a stream started from the web UI's form")
        assert all(r["authorization"] == f"Bearer {KEY}" for r in sent), {r["authorization"][:12] for r in sent}
        assert KEY not in httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text  # nor once a run has started
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=10)
    assert KEY not in out


# --- TLS ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", list(STACKS))
def test_every_stack_refuses_a_self_signed_certificate_by_default(tls: Recorder, stack: str) -> None:
    before = len(tls.received()["tls_refused"])
    streams = SingleStreams(insecure=False)
    try:
        record = streams.run(stack, make_settings(tls.url, max_tokens=5, ignore_eos=False), "none", StopPlan())
    finally:
        streams.close()
    assert record.error is not None and any(words in record.error for words in CERT_REFUSED), record.error
    assert record.tokens == 0 and record.first_token is None
    got = tls.received()
    assert len(got["tls_refused"]) > before  # the server saw the handshake refused, and no request
    assert record.request_id not in {r["request_id"] for r in got["requests"]}



@pytest.mark.parametrize("stack", list(STACKS))
def test_every_stack_accepts_it_with_insecure(tls: Recorder, stack: str) -> None:
    """requests verified anyway wherever $REQUESTS_CA_BUNDLE is set (Debian, CI images: requests lets it replace
    the session's `verify=False`), and geventhttpclient's `insecure=True` only skips the hostname check; both
    failed here before their fix, with the environment this suite runs in."""
    streams = SingleStreams(insecure=True)
    try:
        record = streams.run(stack, make_settings(tls.url, max_tokens=5, ignore_eos=False, insecure=True), "none",
                             StopPlan())
    finally:
        streams.close()
    assert record.error is None and record.done and record.tokens == 5, (record.error, record.tokens)
    assert record.request_id in {r["request_id"] for r in tls.received()["requests"]}
    assert record.stamp_clock == "read"  # TLS is decrypted above the socket: no kernel stamps (the read clock)
    if is_async(stack):  # their network stream stamps the write through TLS too (users/httpcore_stamps.py)
        assert record.written is not None and record.headers is not None
        assert record.sent <= record.written <= record.headers


def test_a_run_against_an_untrusted_certificate_stops_before_any_load_naming_insecure(
        tls: Recorder, tmp_path: Path) -> None:
    posts_before = sum(r["method"] == "POST" for r in tls.received()["requests"])
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "--host", tls.url, "-u", "2", "-t", "2s",
         "--stopstorm-report", str(tmp_path / "r.json"), *CLASSES],
        cwd=ROOT, env={**_no_trust_env(), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    text = run.stdout + run.stderr
    # Refused like a bad option (exit 2, one line): a certificate the clients do not trust stays so for the whole
    # run, unlike a server that is down (which is measured: tests/users/test_reliability.py).
    assert run.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "SSLError" in text and "certificate is not trusted (self-signed certificate)" in text, text[-3000:]
    assert "--insecure" in text, text[-3000:]
    assert not (tmp_path / "r.json").exists()
    assert sum(r["method"] == "POST" for r in tls.received()["requests"]) == posts_before  # no load was sent


def test_https_to_a_plain_http_port_is_refused_saying_so(sim_pool: Any, tmp_path: Path) -> None:
    """The simulator (as uvicorn would) answers a TLS ClientHello with a plain HTTP 400: no certificate to trust,
    so the message says what is likely wrong instead of suggesting --insecure."""
    url = sim_pool.get().url.replace("http://", "https://")
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "--host", url, "-u", "1", "-t", "2s",
         "--stopstorm-report", str(tmp_path / "r.json"), "RequestsUser"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    text = run.stdout + run.stderr
    assert run.returncode == 2 and "Traceback" not in text, text[-3000:]
    assert "TLS handshake failed" in text and "http:// if not" in text, text[-3000:]


def test_a_run_with_insecure_streams_on_every_stack(tls: Recorder, tmp_path: Path) -> None:
    run = run_locust(tmp_path, "--host", tls.url, "--insecure", "-u", "6", "-r", "6", "-t", "3s", "--think-time",
                     "0.2", "--stop-probability", "0", *CLASSES, timeout=120)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    recs = records(tmp_path / "records.jsonl")
    seen = {r["request_id"] for r in tls.received()["requests"]}
    ok = {r["stack"] for r in recs if r["error"] is None and r["done"] and r["request_id"] in seen}
    assert ok == set(STACKS), {r["stack"]: r["error"] for r in recs if r["error"]}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["partial"] is False
