"""Against a second real engine: llama-cpp-python's OpenAI server (scripts/real_llama_cpp.py) with the tiny
random model the project writes itself, on a CPU.

Its truth is its log's `Disconnected from client (via refresh/close) Address(...)` line and its one lock (every
request, GET /v1/models too, waits for the stream that holds it): metrics/truth/llama_stream.py.

The server builds from source (`python3 scripts/real_llama_cpp.py setup`, which .ci/run runs; 5 min on this
project's 2-core machine). Without it these tests skip, saying why; with STOPSTORM_REQUIRE_LLAMA_CPP=1 (set by
.ci/run once setup worked) they fail instead.
"""

from __future__ import annotations

# isort: off
import locust  # noqa: F401  (first, for its monkey-patching)
# isort: on

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import ROOT

from scripts.real_llama_cpp import RealLlamaCpp, cache_dir, is_ready
from stopstorm.metrics.truth.llama_stream import LLAMA_CPP_PYTHON_TRUTH_SOURCE, DisconnectFollower

pytestmark = [pytest.mark.slow, pytest.mark.llama_cpp]

# The disconnect is noticed after the next chunk (~2 ms at ~500 tokens/s), printed, read by a follower that
# polls every 20 ms; generous for a loaded 2-core box.
CLOSE_ABORT_S = 0.25
HOLD_S = 1.0


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("STOPSTORM_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(f"llama-cpp-python required (STOPSTORM_REQUIRE_LLAMA_CPP=1) but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def llama() -> Iterator[RealLlamaCpp]:
    if os.environ.get("STOPSTORM_LLAMA_CPP_SKIP_REASON"):
        _skip_or_fail(os.environ["STOPSTORM_LLAMA_CPP_SKIP_REASON"])
    if not is_ready(cache_dir()):
        _skip_or_fail(f"llama-cpp-python is not set up in {cache_dir()}: run `python3 scripts/real_llama_cpp.py "
                      "setup` (.ci/run does)")
    n = os.cpu_count() or 1
    with RealLlamaCpp(auto_setup=False, cpus=str(n - 1) if n > 1 else None) as server:
        yield server


def _send(url: str, max_tokens: int, rcvbuf: int | None = None) -> socket.socket:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    body = json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "max_tokens": max_tokens}).encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the advertised window stays small
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return s


def _read_events(s: socket.socket, n: int, timeout: float = 30.0) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    while data.count(b"data: ") < n and time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_closed_stream_is_seen_and_its_slot_freed(llama: RealLlamaCpp) -> None:
    follower = DisconnectFollower(llama.log_path).start()
    try:
        follower.poll_once()
        before = len(follower.disconnects)
        s = _send(llama.url, 1500)
        data = _read_events(s, 10)
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        s.close()
        closed = time.monotonic()
        while len(follower.disconnects) == before and time.monotonic() - closed < 5:
            follower.poll_once()
            time.sleep(0.01)
        assert len(follower.disconnects) == before + 1, "no 'Disconnected from client' line after the close"
        seen, line = follower.disconnects[-1]
        assert seen - closed <= CLOSE_ABORT_S and line.client is not None and line.client[0] == "127.0.0.1"
        t0 = time.monotonic()
        assert requests.get(f"{llama.url}/v1/models", timeout=5).status_code == 200
        assert time.monotonic() - t0 < CLOSE_ABORT_S  # the one slot is free again
    finally:
        follower.stop()


def test_a_held_stream_keeps_the_one_slot_until_its_socket_closes(llama: RealLlamaCpp) -> None:
    """A client that stops reading but keeps its socket: the server blocks on the full socket (and its 10-chunk
    channel) with the lock held, so every other request waits for it: one user's hold stalls them all."""
    s = _send(llama.url, 1900, rcvbuf=4096)  # a small window: the server's writes block within ~100 chunks
    _read_events(s, 5)
    time.sleep(0.5)  # ~250 tokens' worth: the socket buffers fill long before that
    answered: list[float] = []
    t = threading.Thread(target=lambda: (requests.get(f"{llama.url}/v1/models", timeout=60),
                                         answered.append(time.monotonic())))
    started = time.monotonic()
    t.start()
    time.sleep(HOLD_S)
    assert not answered, "another request was answered while the held stream kept the slot"
    s.close()
    closed = time.monotonic()
    t.join(30)
    assert answered and answered[0] - closed < 2.0 and answered[0] - started >= HOLD_S


def test_probe_against_llama_cpp_python(llama: RealLlamaCpp, tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "probe.py", "--headless", "--host", llama.url,
         "--server-log", str(llama.log_path), "--server-kind", "llama-cpp-python", "-u", "1", "-r", "1",
         "-t", "240s", "--max-tokens", "400", "--probe-stacks", "requests,httpx-async,openai,fasthttp",
         "--probe-modes", "close,drop", "--probe-repeats", "2", "--probe-early", "none", "--probe-json", str(out),
         "--probe-report", str(tmp_path / "probe-report.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["truth_source"] == LLAMA_CPP_PYTHON_TRUTH_SOURCE
    cells = {(c["stack"], c["close_mode"]): c for c in doc["cells"]}
    for stack in ("requests", "httpx-async", "openai", "fasthttp"):
        close = cells[(stack, "close")]
        assert close["aborted"] == 2 and close["abort_latency_ms_max"] <= CLOSE_ABORT_S * 1e3, close
        assert close["wasted_tokens_mean"] is None  # llama-cpp-python counts no tokens: not known, never 0
    for stack in ("requests", "httpx-async", "fasthttp"):  # break out and drop: closed at once
        assert cells[(stack, "drop")]["aborted"] == 2, cells[(stack, "drop")]
    # the openai SDK's dropped stream waits for the garbage collector: aborted or run to the end, the probe
    # must say which (400 tokens at ~500/s end in about a second)
    assert cells[("openai", "drop")]["outcome"] in ("aborted: slot freed", "not aborted: ran to the end") \
        or cells[("openai", "drop")]["outcome"].startswith("mixed")
