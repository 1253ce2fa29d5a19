"""A Stop through a proxy: nginx and HAProxy (examples/proxies/, run by scripts/proxies.py) on loopback in
front of the simulator, the truth read from the simulator itself (`--truth-url`).

What these tests pin is what docs/guides/proxies.md reports (measured with benchmarks/bench_proxies.py):

- through nginx with `proxy_buffering off`, the probe (`--host` at nginx, `--truth-url` at the simulator)
  sees every `close` aborted within two engine steps;
- a run's report reads its ledger and /metrics from `--truth-url`, not from the proxy;
- mid-stream, every shipped setting passes the Stop on: the proxy closes the upstream connection;
- a Stop while the request is queued (no token written yet) is passed on at once by nginx with
  `proxy_ignore_client_abort off`, and not by nginx with it `on` nor by HAProxy: the request waits for a slot,
  takes it and is aborted only when the proxy's first write to the gone client fails.

Needs the Debian packages nginx and haproxy (.ci/run installs them where missing); without them these tests
skip, saying so, unless STOPSTORM_REQUIRE_PROXIES=1 (what .ci/run sets once they are installed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SimHandle, SimPool
from stream_tools import Streams, ledger_id, make_settings

from scripts.proxies import VARIANTS, Proxy, missing
from stopstorm.users.policy import StopPlan

STEP = ("--step-base-ms", "20", "--max-num-seqs", "2")  # 20 ms steps: two of them dwarf a proxy's own hop


def _need_proxies() -> None:
    gone = missing()
    if gone:
        reason = f"{', '.join(gone)} not installed (Debian: apt-get install nginx haproxy; .ci/run does)"
        if os.environ.get("STOPSTORM_REQUIRE_PROXIES") == "1":
            pytest.fail(f"proxies required (STOPSTORM_REQUIRE_PROXIES=1) but {reason}")
        pytest.skip(reason)


@pytest.fixture
def sim(sim_pool: SimPool) -> SimHandle:
    return sim_pool.fresh(*STEP)


@pytest.fixture
def nginx_sse(sim: SimHandle) -> Iterator[Proxy]:
    _need_proxies()
    with Proxy("nginx-sse", sim.url) as proxy:
        yield proxy


# --- fast: the helper and the option -------------------------------------------------------------------------


def test_every_variant_fills_its_template() -> None:
    for name, variant in VARIANTS.items():
        proxy = Proxy(name, "http://127.0.0.1:8000")
        try:
            text = proxy.config_text()
        finally:
            proxy.close()
        assert "127.0.0.1:8000" in text and f"127.0.0.1:{proxy.port}" in text, name
        for key, value in variant.settings.items():
            assert value in text, (name, key)


def _locust(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "locust", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_bad_truth_url_stops_the_run_naming_the_option(tmp_path: Path) -> None:
    proc = _locust(["-f", "locustfile.py", "--headless", "-t", "1s", "--truth-url", "nowhere",
                    "--stopstorm-report", str(tmp_path / "r.json")], timeout=60)
    assert proc.returncode == 2 and "--truth-url 'nowhere'" in proc.stderr, proc.stderr[-2000:]


# --- slow: real proxies in front of the simulator ------------------------------------------------------------


@pytest.mark.slow
def test_probe_through_nginx_sse_aborts_every_close_within_two_steps(sim: SimHandle, nginx_sse: Proxy,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    proc = _locust(["-f", "probe.py", "--headless", "--host", nginx_sse.url, "--truth-url", sim.url,
                    "-u", "1", "-r", "1", "-t", "120s", "--ignore-eos", "--max-tokens", "300",
                    "--probe-stacks", "requests,httpx,httpx-async,openai-async,fasthttp", "--probe-modes", "close",
                    "--probe-repeats", "3", "--probe-early", "none", "--probe-json", str(out),
                    "--probe-report", str(tmp_path / "probe-report.json")], timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["host"] == nginx_sse.url  # streamed through nginx, judged by the simulator's ledger
    bound_ms = 2 * sim.step_bound(running=1) * 1e3
    for cell in doc["cells"]:
        assert cell["aborted"] == cell["streams"] == 3, cell
        assert cell["abort_latency_ms_p50"] <= bound_ms, (cell, bound_ms)
        # One stream in a cell may lose the CPU on this shared 2-core box (seen once: 96 ms for fasthttp, with
        # a benchmark beside it); the proxy adds no step of its own (docs/guides/proxies.md).
        assert cell["abort_latency_ms_max"] <= bound_ms + 100, (cell, bound_ms)
    # Every stream went through nginx. It logs them 200, not 499: its 499 is for a client gone before the
    # response's headers, and the simulator (as vLLM) sends those at once.
    assert nginx_sse.access_log.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200') == 15


@pytest.mark.slow
def test_run_report_reads_its_truth_from_truth_url(sim: SimHandle, nginx_sse: Proxy, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = _locust(["-f", "locustfile.py", "--headless", "--host", nginx_sse.url, "--truth-url", sim.url,
                    "-u", "2", "-r", "2", "-t", "4s", "--stop-probability", "1", "--stop-at", "tokens:fixed:10",
                    "--close-mix", "close:1", "--max-tokens", "200", "--ignore-eos", "--think-time", "0.05",
                    "--stopstorm-report", str(report), "RequestsUser", "HttpxUser"], timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["meta"]["host"] == nginx_sse.url
    assert doc["meta"]["metrics"]["url"] == f"{sim.url}/metrics"
    figures = doc["overall"]["figures"]
    assert figures["aborted"]["source"] == "simulator ledger"
    assert figures["stopped"]["value"] >= 2 and figures["aborted"]["value"] >= figures["stopped"]["value"] - 2


def _raw(url: str, rid: str, max_tokens: int) -> socket.socket:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    body = json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "max_tokens": max_tokens, "ignore_eos": True}).encode()
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s" % (rid.encode(), len(body), body))
    return s


def _queued_close(sim: SimHandle, url: str, rid: str, occupied_s: float) -> tuple[dict[str, Any], float]:
    """Both slots taken (straight to the simulator); `rid` sent through `url` waits in the queue and its client
    closes; the slots free `occupied_s` after that. Returns its ledger entry and when its client closed."""
    occupants = [_raw(sim.url, f"{rid}-occ{k}", 4000) for k in range(2)]
    time.sleep(0.2)
    queued = _raw(url, rid, 50)
    time.sleep(0.3)
    closed = time.monotonic()
    queued.close()
    time.sleep(occupied_s)
    for s in occupants:
        s.close()
    return sim.wait_entry(f"chatcmpl-{rid}", timeout=20), closed


# Mid-stream every setting passes the Stop on; while queued, only nginx with proxy_ignore_client_abort off does.
DROPS_QUEUED = {"nginx-sse": True, "nginx-buffered": True, "nginx-sse-ignore-abort": False,
                "nginx-buffered-ignore-abort": False, "haproxy": False, "haproxy-abortonclose": False,
                "haproxy-no-delay": False}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_midstream_and_queued(sim: SimHandle, variant: str) -> None:
    _need_proxies()
    assert set(DROPS_QUEUED) == set(VARIANTS)
    occupied_s = 0.6
    with Proxy(variant, sim.url) as proxy:
        streams = Streams()
        try:
            record = streams.run("requests", make_settings(proxy.url), "close", StopPlan(tokens=20))
        finally:
            streams.close()
        assert record.error is None and record.stop is not None
        entry = sim.wait_entry(ledger_id(record), timeout=15)
        assert entry["finish_reason"] == "abort", entry
        # The proxy closes the upstream on the client's close (nginx) or at its next write that fails (HAProxy:
        # its sends wait for more data to coalesce unless http-no-delay); well under the 2000-token stream.
        assert entry["freed"] - record.stop < 1.0, entry
        sim.wait_idle()
        entry, closed = _queued_close(sim, proxy.url, f"q-{variant}", occupied_s)
    assert entry["finish_reason"] == "abort", entry
    waited = entry["freed"] - closed
    if DROPS_QUEUED[variant]:
        assert entry["scheduled"] is None and entry["generated_tokens"] == 0, entry
        # dropped from the queue at once (measured: 7-12 ms); half the occupied time leaves room for a busy box
        assert waited < occupied_s / 2, entry
    else:  # a zombie in the queue: it waited for a slot, took it, made a token, then the proxy's write failed
        assert entry["scheduled"] is not None and entry["generated_tokens"] >= 1, entry
        assert waited >= occupied_s - 0.05, entry
