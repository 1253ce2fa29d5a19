"""llama-cpp-python's per-stream truth (its log's disconnect line + its one lock), without the engine: the log is a
file written here, the lock probe is `GET /v1/models` on a simulator (which answers it at once, as
llama-cpp-python does when no stream holds its lock). Against the real server: tests/test_real_llama_cpp.py."""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (gevent monkey-patches the process, as under Locust)

import time
from pathlib import Path

from conftest import FAST, SimPool

from stopstorm.metrics.truth.llama_stream import DisconnectFollower, LlamaCppPythonStreamTruth
from stopstorm.metrics.truth.log_command import PipeLogFollower

LINE = "Disconnected from client (via refresh/close) Address(host='127.0.0.1', port=41234)\n"


def test_a_disconnect_line_during_the_stream_is_its_abort(sim_pool: SimPool, tmp_path: Path) -> None:
    sim = sim_pool.get(*FAST)
    log = tmp_path / "llama.log"
    log.write_text("INFO:     Application startup complete.\n" + LINE)  # an earlier stream's line
    truth = LlamaCppPythonStreamTruth(sim.url, log).start()
    try:
        assert truth.available()
        truth.before_stream()
        with log.open("a") as f:
            f.write('INFO:     127.0.0.1:41234 - "POST /v1/chat/completions HTTP/1.1" 200 OK\ndisconnected\n' + LINE)
        written = time.monotonic()
        entry = truth.settle("chatcmpl-x", timeout=5.0)
        assert entry["finish_reason"] == "abort" and entry["log_client"] == ["127.0.0.1", 41234]
        assert entry["disconnect_seen"] is not None and entry["disconnect_seen"] >= written - 0.05
        assert entry["freed"] is not None and entry["freed"] <= entry["slot_free"]
        assert entry["generated_tokens"] is None  # llama-cpp-python counts none: unknown, never 0

        truth.before_stream()  # a stream that ran to its end: no line, the lock was let go
        entry = truth.settle("chatcmpl-y", timeout=5.0)
        assert entry["finish_reason"] == "finished" and entry["disconnect_seen"] is None
        assert entry["freed"] == entry["slot_free"] is not None
    finally:
        truth.close()


def test_no_server_is_no_truth_and_a_piped_log_is_refused(tmp_path: Path) -> None:
    truth = LlamaCppPythonStreamTruth("http://127.0.0.1:9", tmp_path / "none.log")
    try:
        assert not truth.available() and truth.metrics.last_error
    finally:
        truth.close()
    piped = LlamaCppPythonStreamTruth("http://127.0.0.1:9", PipeLogFollower("true"))
    try:
        assert not piped.available() and "--server-log FILE" in (piped.metrics.last_error or "")
    finally:
        piped.close()


def test_follower_keeps_only_disconnect_lines(tmp_path: Path) -> None:
    log = tmp_path / "llama.log"
    log.write_text("")
    follower = DisconnectFollower(log).start()
    try:
        log.write_text("disconnected\n" + LINE + "Disconnected from client (via refresh/close) before llm invoked "
                       "Address(host='::1', port=5)\n")
        follower.poll_once()
        assert [line.client for _, line in follower.disconnects] == [("127.0.0.1", 41234), ("::1", 5)]
        assert follower.lines == 3
    finally:
        follower.stop()
