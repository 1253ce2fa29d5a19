"""Every client stack × close mode against the simulator, judged by its ledger (server truth), not by the client.

Streams run one at a time through each stack's transport with the shared core (`run_stream` / `arun_stream`,
async stacks through the bridge), as the stop-semantics probe runs them, without Locust's users. The process
is gevent-patched the way a locustfile is: importing `locust` (first, below) patches everything.

Library versions these behaviours were measured with: requests 2.34, httpx 0.28, geventhttpclient 2.6.1,
openai 3.57 (over httpx2 2.16); a failure message prints the installed versions.
"""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    # conftest.py imported httpx (and so ssl) before us; a locustfile imports locust first and never sees this.
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (gevent monkey-patches the process, as under Locust)

import ast
import contextlib
import dataclasses
import gc
import random
import re
import socket
import statistics
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from conftest import DISCONNECT_TOL_S, FAST, ROOT, Entry, SimHandle, SimPool, wait_until
from gevent.server import StreamServer
from stream_tools import (
    CLOSE_SIM_ARGS,
    HOLD_S,
    STOP_AT,
    Streams,
    check_abort_at_next_step,
    check_no_waste,
    engine_lag,
    ledger_id,
    make_settings,
    versions,
)

from stopstorm.metrics.record import StreamRecord
from stopstorm.simulator.server import FAULT_HEADER
from stopstorm.users.policy import StopPlan
from stopstorm.users.stacks import STACKS, is_async, user_class

NAMES = list(STACKS)
SIM_ARGS = (*FAST, "--max-num-seqs", "16")
# Client-side first token after the server's: the chunk's trip plus the client's parsing (the openai SDK
# builds its model classes on the first chunk it sees).
TTFT_TOL_S = 0.030
# How soon the server must see a stack's close: conftest's raw-socket bound, doubled for the client library's
# own close path (SDK layers, the hop to the bridge's loop) on a loaded 2-core box.
CLOSE_SEEN_TOL_S = 2 * DISCONNECT_TOL_S
# A dropped stream the garbage collector closes: after the collection, (async) a hop to the loop and a close.
GC_CLOSE_TOL_S = 0.050

TIMER_SLACK_S = 0.002

# What breaking out of the loop and dropping every reference does, measured (DESIGN.md §5): True = the
# socket closes at once by reference counting; False = only the cyclic garbage collector closes it.
DROP_CLOSES_AT_ONCE = {"requests": True, "httpx": True, "httpx-async": True, "fasthttp": True,
                       "openai": False, "openai-async": False}

@pytest.fixture(scope="module")
def sim(sim_pool: SimPool) -> SimHandle:
    return sim_pool.get(*SIM_ARGS)


@pytest.fixture(scope="module")
def close_sim(sim_pool: SimPool) -> SimHandle:
    """The close and drop tests' simulator: the default 15 ms step (stream_tools.CLOSE_SIM_ARGS says why)."""
    return sim_pool.get(*CLOSE_SIM_ARGS)


@pytest.fixture(scope="module")
def streams() -> Iterator[Streams]:
    s = Streams()
    yield s
    s.close()


@contextlib.contextmanager
def automatic_gc_off() -> Iterator[None]:
    """No automatic collection, so whether a drop closes by reference counting alone is what is measured."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def step_bound(sim: SimHandle) -> float:
    """Longest one engine step of this simulator may take (every slot running), slack included."""
    return sim.step_bound(running=sim.config.max_num_seqs)


def freed_entry(sim: SimHandle, record: StreamRecord, timeout: float = 15.0) -> Entry:
    return sim.wait_entry(ledger_id(record), timeout=timeout)


def check_ok_stop(record: StreamRecord) -> None:
    assert record.error is None, record.error
    assert record.status == 200
    assert record.stop is not None and record.tokens_at_stop is not None
    assert record.tokens_at_stop >= STOP_AT


def lag(sim: SimHandle) -> float:
    """The engine's total step lag so far (its own measure): a test takes it before its stream and passes it to
    `check_prompt_abort`, which allows exactly the lag that accrued meanwhile."""
    return engine_lag(sim.http.get("/stopstorm/stats").raise_for_status().json())


def one_step(sim: SimHandle) -> float:
    """One modelled engine step with every slot running (no lag, no slack)."""
    return sim.config.step_duration(sim.config.max_num_seqs, 0)


def check_prompt_abort(sim: SimHandle, entry: Entry, after: float, by: float, lag_before: float,
                       seen_tol: float = CLOSE_SEEN_TOL_S) -> None:
    """The server saw the close between `after` and `by` + `seen_tol` (the client library's close), then acted
    on it at the next step boundary (stream_tools.check_abort_at_next_step: its own stamps, one step plus the
    lag its engine measured since `lag_before`)."""
    assert entry["finish_reason"] == "abort", entry
    seen = entry["disconnect_seen"]
    assert seen is not None
    assert after <= seen <= by + seen_tol, (
        f"close seen {(seen - after) * 1e3:.2f} ms after {after:.4f}, {(seen - by) * 1e3:.2f} ms after {by:.4f}")
    check_abort_at_next_step(entry, one_step(sim), lag(sim) - lag_before)


# --- close modes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", NAMES)
def test_close_aborts_within_one_step(close_sim: SimHandle, streams: Streams, stack: str) -> None:
    """`close`: the server sees the close at once and frees the slot at the next step boundary, having generated
    no token the user did not read (README: closing stacks "aborted within one 15 ms step", 0 wasted tokens).

    All from the ledger, at the default 15 ms step: the stream stops at token 20 of 2000 (ignore_eos), so the
    server must have generated exactly 20 (stream_tools.check_no_waste names the one exception, a client that
    let a step end before its close reached the server); none after it saw the close; the slot freed within
    one step of the last token it counted, of seeing the close and, wasting nothing, of the user's Stop; and
    within that plus the close's own tolerance (CLOSE_SEEN_TOL_S) of the client's close returning. "One step"
    is the modelled 15.8 ms plus what the engine's steps ran late meanwhile, by its own measure.

    Checked by breaking simulator/engine.py to defer every abort by one full step, both ways (the step's token
    counted and sent to the closed socket; or dropped and the slot freed a step late): this test failed for
    all six stacks both ways (2026-12-02).
    """
    sim = close_sim
    lag_before = lag(sim)
    record = streams.run(stack, make_settings(sim.url), "close", StopPlan(tokens=STOP_AT))
    check_ok_stop(record)
    assert record.tokens_at_stop == STOP_AT  # one token a chunk: the Stop falls on the token it asked for
    assert record.closed is not None and record.stop <= record.closed
    entry = freed_entry(sim, record)
    check_prompt_abort(sim, entry, record.stop, record.closed, lag_before)
    bound = one_step(sim) + lag(sim) - lag_before
    if check_no_waste(entry, record, one_step(sim)) == 0:
        # The last token counted is the one read at Stop: Stop → freed lies inside the step after it.
        assert entry["freed"] - record.stop <= bound, f"abort latency {(entry['freed'] - record.stop) * 1e3:.2f} ms"
    assert entry["freed"] - record.closed <= bound + CLOSE_SEEN_TOL_S, (
        f"slot freed {(entry['freed'] - record.closed) * 1e3:.2f} ms after the close returned")


@pytest.mark.parametrize("stack", NAMES)
def test_drop_is_the_librarys_business(close_sim: SimHandle, streams: Streams, stack: str) -> None:
    """`drop`: break out and drop every reference. Measured with automatic GC off:

    - requests, httpx, httpx-async and geventhttpclient close the socket by reference counting the moment the
      last reference goes (requests/httpx: closing the line generator closes the connection; httpx-async: the
      async generator's finaliser schedules its close on the loop; geventhttpclient: the response's `__del__`
      releases an unfinished response's socket), so the server aborts at the next step boundary and nothing is
      wasted, exactly as for `close` (same bounds, same 15 ms step);
    - the openai SDK (sync and async) does not: its `Stream` sits in a reference cycle with its own generator,
      so the connection stays open and the server keeps generating until the cyclic garbage collector runs;
      only then is the close seen (DESIGN.md §5), and acted on at the next step boundary.

    Checked by deferring every abort one step in simulator/engine.py (both ways, as for `close`): failed for
    all six stacks (2026-12-02).
    """
    sim = close_sim
    with automatic_gc_off():
        lag_before = lag(sim)
        record = streams.run(stack, make_settings(sim.url), "drop", StopPlan(tokens=STOP_AT))
        returned = time.monotonic()
        check_ok_stop(record)
        assert record.closed is None  # nobody closed it
        rid = ledger_id(record)
        if DROP_CLOSES_AT_ONCE[stack]:
            entry = freed_entry(sim, record)
            check_prompt_abort(sim, entry, record.stop, returned, lag_before)
            check_no_waste(entry, record, one_step(sim))
            return
        time.sleep(0.5)
        entry = sim.entry(rid)
        assert entry is not None
        assert entry["disconnect_seen"] is None and entry["finish_reason"] is None, (
            f"{stack} closed a dropped stream without the garbage collector ({versions()}): {entry}")
        assert entry["generated_tokens"] - record.tokens_at_stop >= 0.4 / step_bound(sim)  # still generating
        lag_before = lag(sim)
        collect_at = time.monotonic()
        gc.collect()
        collected_at = time.monotonic()
    entry = freed_entry(sim, record)
    check_prompt_abort(sim, entry, collect_at, collected_at, lag_before, seen_tol=GC_CLOSE_TOL_S)


@pytest.mark.parametrize("stack", NAMES)
def test_hold_keeps_generating_until_released(sim: SimHandle, streams: Streams, stack: str) -> None:
    """`hold`: the socket stays open without reading, so the server never notices and keeps generating; the
    release at the end of --hold-seconds aborts it at the next step boundary (the same server-side checks as
    `close`; with every abort deferred one step and its token counted, this failed for all six stacks)."""
    lag_before = lag(sim)
    record, go = streams.prepare(stack, make_settings(sim.url), "hold", StopPlan(tokens=STOP_AT))
    greenlet = gevent.spawn(go)
    wait_until(lambda: record.stop is not None, timeout=10, what="Stop")
    rid = ledger_id(record)
    seen = []
    for at in (0.1, 0.45):
        gevent.sleep(max(0.0, record.stop + at - time.monotonic()))
        entry = sim.entry(rid)
        assert entry is not None
        assert entry["disconnect_seen"] is None and entry["finish_reason"] is None, (at, entry)
        seen.append(entry["generated_tokens"])
    assert seen[0] < seen[1], f"not generating while held: {seen}"
    assert record.closed is None  # still held
    greenlet.join(timeout=HOLD_S + 10)
    assert greenlet.successful(), greenlet.exception
    check_ok_stop(record)
    # uvloop's timers have millisecond resolution and may wake a hair early.
    released_after = record.stop + HOLD_S - TIMER_SLACK_S
    assert record.closed is not None and record.closed >= released_after
    entry = freed_entry(sim, record)
    assert entry["generated_tokens"] > seen[1]
    check_prompt_abort(sim, entry, released_after, record.closed, lag_before)


@pytest.mark.parametrize("stack", NAMES)
def test_time_based_stop_holds_without_closing(sim: SimHandle, streams: Streams, stack: str) -> None:
    """A `seconds:` Stop with `hold` must not interrupt the read (several libraries close the connection when a
    waiting read is interrupted, which would turn the hold into a close): the server sees nothing until the
    release, and the Stop is stamped at its time, not at the next chunk."""
    stop_after = 0.3
    lag_before = lag(sim)
    record, go = streams.prepare(stack, make_settings(sim.url), "hold", StopPlan(seconds=stop_after))
    greenlet = gevent.spawn(go)
    greenlet.join(timeout=stop_after + HOLD_S + 10)
    assert greenlet.successful(), greenlet.exception
    check_ok_stop(record)
    assert record.stop is not None and record.closed is not None
    assert record.stop - record.sent >= stop_after - TIMER_SLACK_S
    assert record.stop - record.sent <= stop_after + step_bound(sim)
    entry = freed_entry(sim, record)
    assert entry["disconnect_seen"] is not None
    assert entry["disconnect_seen"] >= record.closed - CLOSE_SEEN_TOL_S, "the hold was a close"
    check_abort_at_next_step(entry, one_step(sim), lag(sim) - lag_before)  # the release


@pytest.mark.parametrize("stack", NAMES)
def test_killed_user_closes_a_held_stream(sim: SimHandle, streams: Streams, stack: str) -> None:
    """Locust kills users at the end of a run; one killed mid-hold must still close its stream."""
    lag_before = lag(sim)
    record, go = streams.prepare(stack, make_settings(sim.url), "hold", StopPlan(tokens=STOP_AT))
    greenlet = gevent.spawn(go)
    wait_until(lambda: record.stop is not None, timeout=10, what="Stop")
    gevent.sleep(0.05)
    killed = time.monotonic()
    greenlet.kill(block=True, timeout=5)
    entry = freed_entry(sim, record)
    assert entry["disconnect_seen"] is not None and entry["disconnect_seen"] >= killed - TIMER_SLACK_S
    check_abort_at_next_step(entry, one_step(sim), lag(sim) - lag_before)


@pytest.mark.parametrize("stack", NAMES)
def test_none_reads_to_the_end(sim: SimHandle, streams: Streams, stack: str) -> None:
    """`none`: Stop is recorded, reading goes on to [DONE]; the server finishes the request normally."""
    record = streams.run(stack, make_settings(sim.url, max_tokens=40), "none", StopPlan(tokens=10))
    assert record.error is None, record.error
    assert record.tokens_at_stop == 10 and record.tokens_read == 10
    assert record.done and record.finish_reason == "length"
    entry = freed_entry(sim, record)
    assert entry["finish_reason"] == "length" and entry["disconnect_seen"] is None
    assert record.tokens == entry["generated_tokens"] == entry["sent_tokens"] == 40


# --- what every stack records -----------------------------------------------------------------------------------


@pytest.mark.parametrize("usage", ["continuous", "final", "none"])
@pytest.mark.parametrize("stack", NAMES)
def test_full_stream_matches_the_ledger(sim: SimHandle, streams: Streams, stack: str, usage: str) -> None:
    """A stream read to its end: tokens, TTFT and marks agree with the server's, whatever usage it sends."""
    settings = make_settings(sim.url, max_tokens=30, no_usage=usage == "none",
                             no_continuous_usage=usage == "final")
    record = streams.run(stack, settings, "close", StopPlan())
    assert record.error is None, record.error
    assert record.status == 200 and record.done and not record.stopped
    assert record.server_id == ledger_id(record)
    entry = freed_entry(sim, record)
    assert entry["finish_reason"] == "length"
    assert record.tokens == entry["sent_tokens"] == entry["generated_tokens"] == 30
    assert record.usage_tokens == (None if usage == "none" else 30)
    assert record.prompt_tokens == (None if usage == "none" else entry["prompt_tokens"])
    assert record.sent <= entry["arrival"] <= record.headers <= record.first_token <= record.ended
    # One chunk per token, each stamped when its line came in: no batched reads (FastHttp's iter_lines reads
    # 1 KiB at a time, which would bunch tokens together and leave most gaps near zero).
    assert len(record.chunk_times) == 30
    assert statistics.median(record.itl) >= 0.5 * sim.config.step_base_s, record.itl
    lag = record.first_token - entry["first_token"]
    assert 0 <= lag <= TTFT_TOL_S, f"client first token {lag * 1e3:.2f} ms after the server's"
    ledger_ttft = entry["first_token"] - entry["arrival"]
    assert ledger_ttft <= record.ttft <= ledger_ttft + (entry["arrival"] - record.sent) + TTFT_TOL_S


@pytest.mark.parametrize("stack", NAMES)
def test_completions_endpoint(sim: SimHandle, streams: Streams, stack: str) -> None:
    record = streams.run(stack, make_settings(sim.url, endpoint="completions", max_tokens=12), "close", StopPlan())
    assert record.error is None, record.error
    assert record.server_id == "cmpl-" + record.request_id
    entry = freed_entry(sim, record)
    assert entry["endpoint"] == "completions" and entry["finish_reason"] == "length"
    assert record.tokens == entry["sent_tokens"] == 12 and record.done


# --- failures, in words -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", NAMES)
def test_http_404_carries_the_servers_message(sim: SimHandle, streams: Streams, stack: str) -> None:
    record = streams.run(stack, make_settings(sim.url, model="nope"), "close", StopPlan())
    assert record.status == 404 and record.headers is not None
    assert record.error is not None and record.error.startswith("HTTP 404: "), record.error
    assert "The model `nope` does not exist." in record.error
    assert record.first_token is None and record.tokens == 0


@pytest.mark.parametrize("stack", NAMES)
def test_server_error_mid_stream(sim: SimHandle, streams: Streams, stack: str) -> None:
    settings = make_settings(sim.url, max_tokens=50)
    request = settings.requests.build(random.Random())
    request = dataclasses.replace(request, headers={**request.headers, FAULT_HEADER: "error-after:5"})
    record = streams.run(stack, settings, "close", StopPlan(), request=request)
    assert record.error is not None and record.error.startswith("server error mid-stream: "), record.error
    assert "Simulated engine error" in record.error
    assert 0 < record.tokens <= 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stack", NAMES)
def test_connection_refused(stack: str) -> None:
    streams = Streams()
    try:
        record = streams.run(stack, make_settings(f"http://127.0.0.1:{free_port()}"), "close", StopPlan())
    finally:
        streams.close()
    assert record.error is not None and record.error.startswith("connection error: "), record.error
    assert record.status is None and record.headers is None


_CHUNK = (b'data: {"id":"chatcmpl-raw","object":"chat.completion.chunk","created":0,"model":"llm",'
          b'"choices":[{"index":0,"delta":{"content":"hi"},"logprobs":null,"finish_reason":null}]}\n\n')


class RawServer:
    """A misbehaving server on a gevent StreamServer: `cut` (the body stops mid-stream and the socket closes),
    `no-done` (a clean end of body without data: [DONE]) or `silent` (headers, then nothing)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _handle(self, sock: socket.socket, _addr: Any) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length:\s*(\d+)", head)
        while match and len(body) < int(match.group(1)):
            body += sock.recv(65536)
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        if self.behaviour != "silent":
            for _ in range(3):
                sock.sendall(b"%x\r\n%s\r\n" % (len(_CHUNK), _CHUNK))
        if self.behaviour == "no-done":
            sock.sendall(b"0\r\n\r\n")
        if self.behaviour == "silent":
            gevent.sleep(3)
        sock.close()

    def close(self) -> None:
        self.server.stop(timeout=1)


@pytest.mark.parametrize(("behaviour", "expected"), [
    ("cut", "stream cut off: "),
    ("no-done", "stream cut off: the server closed it before data: [DONE]"),
    ("silent", "timeout: "),
])
@pytest.mark.parametrize("stack", NAMES)
def test_broken_streams(stack: str, behaviour: str, expected: str) -> None:
    server = RawServer(behaviour)
    streams = Streams()
    try:
        record = streams.run(stack, make_settings(server.url, read_timeout=0.3), "close", StopPlan())
    finally:
        streams.close()
        server.close()
    assert record.error is not None and record.error.startswith(expected), record.error
    assert record.status == 200 and not record.done
    assert record.tokens == (0 if behaviour == "silent" else 3)


# --- the registry -----------------------------------------------------------------------------------------------


def test_registry_names_every_stack() -> None:
    assert NAMES == ["requests", "httpx", "httpx-async", "openai", "openai-async", "fasthttp"]
    for name, cls in STACKS.items():
        assert cls.stack == name and user_class(name) is cls
        assert cls.transport_class.name == name  # type: ignore[attr-defined]
    assert [n for n in NAMES if is_async(n)] == ["httpx-async", "openai-async"]


def test_unknown_stack_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown client stack 'curl'; choose from requests, httpx, httpx-async"):
        user_class("curl")


def test_locustfile_offers_every_stack() -> None:
    tree = ast.parse((ROOT / "locustfile.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert {cls.__name__ for cls in STACKS.values()} <= imported
