"""Where the truth is read (--truth-url, --server-kind): the one helper both the run's report and the probe use,
the probe's per-stream reader chosen by server kind, and the line a run gets when its server is not vLLM."""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (gevent monkey-patches the process, as under Locust)

import argparse
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FAST, FIXTURES_DIR, SimPool

from stopstorm.metrics.plugin.truth_target import check_truth_url, describe_server, stream_truth, truth_host
from stopstorm.metrics.truth.llama_stream import LlamaCppPythonStreamTruth
from stopstorm.metrics.truth.vllm_stream import VllmStreamTruth


class Env:
    def __init__(self, host: str, truth_url: str = "", server_kind: str = "auto") -> None:
        self.host = host
        self.parsed_options = argparse.Namespace(truth_url=truth_url, server_kind=server_kind)


def test_truth_url_is_checked_and_defaults_to_the_host() -> None:
    assert check_truth_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    for bad in ("127.0.0.1:8000", "ftp://x", "http://h:8000/?q=1", "http://h:99999"):
        with pytest.raises(ValueError, match="--truth-url"):
            check_truth_url(bad)
    assert truth_host(Env("http://127.0.0.1:8080/")) == "http://127.0.0.1:8080"
    assert truth_host(Env("http://127.0.0.1:8080", "http://127.0.0.1:8000/")) == "http://127.0.0.1:8000"


def test_the_probe_reader_follows_the_server_kind(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("")
    for kind, cls in (("auto", VllmStreamTruth), ("vllm", VllmStreamTruth),
                      ("llama-cpp-python", LlamaCppPythonStreamTruth)):
        reader = stream_truth(Env("http://127.0.0.1:8080", "http://127.0.0.1:9", kind), log)
        try:
            assert isinstance(reader, cls) and reader.metrics.url.startswith("http://127.0.0.1:9/"), kind
        finally:
            reader.close()
    sglang = stream_truth(Env("http://127.0.0.1:8080", server_kind="sglang"), log)
    assert not sglang.available() and "no per-stream truth for SGLang" in (sglang.metrics.last_error or "")


@pytest.fixture
def sglang_server() -> Iterator[str]:
    text = FIXTURES_DIR.joinpath("sglang", "collector-metrics.txt").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            if self.path == "/metrics":
                self.wfile.write(text)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_is_named_by_its_metrics(sim_pool: SimPool, sglang_server: str) -> None:
    found, line = describe_server(sglang_server)
    assert found is not None and found.kind == "sglang"
    assert "running 2.0, waiting 5.0, generation tokens 15230.0, aborted 3.0" in line
    sim = sim_pool.get(*FAST)
    found, _ = describe_server(sim.url)  # the simulator speaks vLLM's names
    assert found is not None and found.kind == "vllm"
    found, line = describe_server("http://127.0.0.1:9")
    assert found is None and "--server-kind" in line
    found, line = describe_server("http://127.0.0.1:9", "llama-cpp-python")
    assert found is not None and "no /metrics of its own" in line
