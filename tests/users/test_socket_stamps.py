"""Kernel receive stamps (users/socket_stamps.py): a read that ran late keeps the time its bytes arrived.

Judged against the simulator's ledger (its clock read just before each chunk's write, `--ledger-send-times`), never
against the client's own clock. The process is held whole (a blocking sleep in a greenlet: no greenlet runs, as
when other streams' parsing holds the hub) from the moment the headers are in until after the first token was
sent; a stamp taken when the parser gets the chunk is then late by the rest of the hold, a kernel stamp is not.
"""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (gevent monkey-patches the process, as under Locust)

import socket
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from conftest import SimHandle, SimPool
from gevent.monkey import get_original
from stream_tools import Streams, ledger_id, make_settings

from stopstorm.metrics.plugin.self_monitor import SelfMonitor
from stopstorm.metrics.record import StreamRecord
from stopstorm.users import socket_stamps
from stopstorm.users.policy import StopPlan
from stopstorm.users.socket_stamps import KERNEL, READ, StampingSocket, enable_receive_stamps

# 200 ms steps: the first token goes out one (prefill) step after the headers, the second a step later.
SLOW = ("--step-base-ms", "200", "--max-num-seqs", "4", "--ledger-send-times")
HOLD_S = 0.3  # from the headers: covers the first token's send (~200 ms in), ends before the second (~400 ms)
# Kernel arrival after the server's pre-write stamp: the write and the loopback trip (~0.1 ms idle), plus the
# server process preempted between its stamp and its write on a loaded host. A read-clock stamp is late by the
# rest of the hold, ~100 ms.
ARRIVAL_TOL_S = 0.020
# The kernel's stamp is CLOCK_REALTIME, turned into the monotonic clock at the read from two clock readings: off
# by the time between them (a microsecond; more when the process is preempted between them on a loaded host).
CLOCK_TOL_S = 0.001
# Plain HTTP on Linux: every sync stack (httpx and the openai SDK through users/httpcore_stamps.py); the async
# stacks read on the bridge's asyncio loop, which keeps the read clock.
STAMPED = ("requests", "fasthttp", "httpx", "openai")


@pytest.fixture(scope="module")
def slow_sim(sim_pool: SimPool) -> SimHandle:
    return sim_pool.get(*SLOW)


@pytest.fixture(scope="module")
def streams() -> Iterator[Streams]:
    s = Streams()
    yield s
    s.close()


def _held_stream(stack: str, sim: SimHandle, streams: Streams) -> tuple[StreamRecord, float, float]:
    """Three tokens read to the end, the process held HOLD_S from the headers on; the record and the hold."""
    settings = make_settings(sim.url, max_tokens=3, stop_probability=0.0)
    record, go = streams.prepare(stack, settings, "close", StopPlan())
    blocking_sleep = get_original("time", "sleep")

    def hold() -> tuple[float, float]:
        while record.headers is None and record.ended is None:
            gevent.sleep(0.0005)
        t0 = time.monotonic()
        blocking_sleep(HOLD_S)
        return t0, time.monotonic()

    holder = gevent.spawn(hold)
    go()
    held_from, held_to = holder.get(timeout=10)
    return record, held_from, held_to


@pytest.mark.parametrize("stack", STAMPED)
def test_a_late_read_keeps_the_kernel_s_arrival_time(stack: str, slow_sim: SimHandle, streams: Streams) -> None:
    record, held_from, held_to = _held_stream(stack, slow_sim, streams)
    assert record.error is None and record.done and record.tokens == 3, record
    e = slow_sim.wait_entry(ledger_id(record))
    first_sent = e["first_sent"]
    assert held_from < first_sent < held_to - 0.05, "the first token was not sent while the process was held"
    assert record.stamp_clock == KERNEL
    assert record.first_token is not None
    assert first_sent - CLOCK_TOL_S <= record.first_token <= first_sent + ARRIVAL_TOL_S, (
        f"first token stamped {(record.first_token - first_sent) * 1e3:.1f} ms after its send "
        f"(held until {(held_to - first_sent) * 1e3:.1f} ms after it)")
    # Every chunk's stamp is at or after its own send and never after its read (after the hold for the first)
    sends = {n: t for t, n in e["send_times"]}
    for at, n in zip(record.chunk_times, record.chunk_tokens, strict=True):
        assert sends[n] - CLOCK_TOL_S <= at, (n, at - sends[n])
    assert record.chunk_times[-1] <= time.monotonic()
    # The request's write: after the user's send, before the server had it whole, before the headers came back
    assert record.written is not None and record.headers is not None
    assert record.sent <= record.written <= e["arrival"] + 0.001 <= record.headers + 0.001
    assert record.ttft == pytest.approx(record.first_token - record.written)


@pytest.mark.parametrize("stack", ["requests", "httpx"])
def test_the_hold_is_real_a_read_clock_stamp_is_late_by_it(stack: str, slow_sim: SimHandle,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The same held stream with the kernel stamps off (new connections, as bench_timing's --read-clock-too runs
    it): its stamp is the read's, after the hold. Shows the test above can fail: without the kernel's stamp the
    first token is ~100 ms late."""
    monkeypatch.setattr(socket_stamps, "RECEIVE_STAMPS", False)
    fresh = Streams()  # no connection made while the stamps were on
    try:
        record, _held_from, held_to = _held_stream(stack, slow_sim, fresh)
    finally:
        fresh.close()
    assert record.error is None and record.stamp_clock == READ and record.written is None
    e = slow_sim.wait_entry(ledger_id(record))
    assert record.first_token is not None and record.first_token >= held_to
    assert record.first_token - e["first_sent"] > ARRIVAL_TOL_S


def test_the_self_monitor_judges_kernel_stamps_and_counts_them() -> None:
    """A kernel stamp is judged by the loop's lateness at it, as a read stamp is: a read that came late after a
    stall may have taken several chunks at once and given them all the last one's arrival. Counted apart too."""
    monitor = SelfMonitor()
    kernel = StreamRecord(stack="requests", close_mode="close", endpoint="chat", request_id="k", stop_plan="never",
                          wall_start=0.0, sent=1.0, first_token=1.1, chunk_times=[1.1, 1.2, 1.3],
                          stamp_clock=KERNEL)
    read = StreamRecord(stack="requests", close_mode="close", endpoint="chat", request_id="r", stop_plan="never",
                        wall_start=0.0, sent=1.0, first_token=1.1, chunk_times=[1.1, 1.2])
    monitor.check(kernel, now=2.0)
    monitor.check(read, now=2.0)
    s = monitor.summary()
    assert s["ttft"]["kernel"] == 1 and s["itl"]["kernel"] == 2
    assert s["ttft"]["checked"] == 2 and s["itl"]["checked"] == 3


def _kernel_record(times: list[float], headers: float = 1.0, clock: str = KERNEL) -> StreamRecord:
    return StreamRecord(stack="requests", close_mode="close", endpoint="chat", request_id="k", stop_plan="never",
                        wall_start=0.0, sent=0.9, written=0.95, headers=headers, first_token=times[0],
                        chunk_times=times, stamp_clock=clock)


def test_chunks_of_one_read_are_flagged_by_their_shared_stamp() -> None:
    """The kernel gives one stamp a read, the last segment's: chunks that share a stamp came in one read, and
    all but the last carry a later arrival than their own, by at most the time since the stamp before that
    read. The loop ran on time throughout here (no stall sampled), so only the shared stamp can say so."""
    monitor = SelfMonitor(bound=0.001)
    # chunk 1 came in one read with chunk 2 (both 1.2): late by at most 1.2 - 1.1; the gaps 0-1 and 1-2 flagged
    monitor.check(_kernel_record([1.1, 1.2, 1.2, 1.3]), now=2.0)
    s = monitor.summary()
    assert s["ttft"]["flagged"] == 0 and s["itl"]["flagged"] == 2 and s["itl"]["checked"] == 3
    assert s["itl"]["late_max_ms"] == pytest.approx(100.0)
    # the first token came in one read with the next two: late by at most its stamp - the headers' (0.5 s)
    monitor.check(_kernel_record([1.5, 1.5, 1.5, 1.6]), now=2.0)
    s = monitor.summary()
    assert s["ttft"]["flagged"] == 1 and s["ttft"]["late_max_ms"] == pytest.approx(500.0)
    assert s["itl"]["flagged"] == 2 + 2  # gaps 0-1 and 1-2; chunk 2 is its read's last, 2-3 is clean
    # the headers in that same read too: nothing of the answer came before the request's write (0.95)
    monitor.check(_kernel_record([1.5, 1.5], headers=1.5), now=2.0)
    assert monitor.summary()["ttft"]["late_max_ms"] == pytest.approx(550.0)


def test_a_shared_stamp_on_the_read_clock_is_judged_by_the_loop_alone() -> None:
    """Read-clock stamps of one read are equal because the parser got them at once; the loop's lag is their
    measure (unchanged), and a stamp that merely equals its neighbour is not evidence of anything there."""
    monitor = SelfMonitor(bound=0.001)
    monitor.check(_kernel_record([1.5, 1.5, 1.5, 1.6], clock="read"), now=2.0)
    s = monitor.summary()
    assert s["ttft"]["flagged"] == 0 and s["itl"]["flagged"] == 0


def test_no_receive_stamps_over_tls_or_on_a_unix_socket() -> None:
    a, b = socket.socketpair()
    try:
        # AF_UNIX: setsockopt is accepted, but only TCP and UDP carry receive stamps; what matters here is that
        # the answer is a bool and the wrapper still reads.
        assert enable_receive_stamps(a) in (True, False)
        wrapped = StampingSocket(a)
        b.sendall(b"x")
        assert wrapped.recv(4) == b"x" and wrapped.arrival is not None

        class _Tls:
            def getpeercert(self) -> None: ...

            def recvmsg_into(self) -> None: ...

        assert enable_receive_stamps(_Tls()) is False
    finally:
        a.close()
        b.close()


# --- the async stacks: their network stream stamps the write and the reads (users/httpcore_stamps.py) ----------

CONNECT_DELAY_S = 0.08  # pre-write work (here: a slow connect) the TTFT must not count


@pytest.mark.parametrize("stack", ["httpx-async", "openai-async"])
def test_async_stacks_count_ttft_from_the_write(stack: str, slow_sim: SimHandle,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's own work before the write (the SDK building its request, the pool connecting: issue 21
    measured the openai SDK's ~2 ms a request queued 64 deep on one loop) is not the server's time to first
    token. Judged against the ledger: the write stamp comes before the server's arrival and within a loopback
    trip of it, and the client's TTFT is the server's (arrival → first send) plus the trip back, not plus the
    delay. With TTFT counted from the send stamp (the code before 2026-12-06) it was ~80 ms over."""
    import asyncio

    from stopstorm.users import httpcore_stamps

    connect = httpcore_stamps._StampedAsyncBackend.connect_tcp

    async def slow_connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(CONNECT_DELAY_S)
        return await connect(self, *args, **kwargs)

    monkeypatch.setattr(httpcore_stamps._StampedAsyncBackend, "connect_tcp", slow_connect)
    fresh = Streams()  # a new connection, through the slow connect
    try:
        record = fresh.run(stack, make_settings(slow_sim.url, max_tokens=3, stop_probability=0.0), "close",
                           StopPlan())
    finally:
        fresh.close()
    assert record.error is None and record.done and record.tokens == 3, record
    e = slow_sim.wait_entry(ledger_id(record))
    assert record.stamp_clock == READ  # the loop's clock at the network read, not the kernel's
    assert record.written is not None and record.headers is not None and record.first_token is not None
    assert record.written - record.sent >= CONNECT_DELAY_S
    assert record.written <= e["arrival"] + CLOCK_TOL_S, (record.written - e["arrival"]) * 1e3
    assert e["arrival"] - record.written <= ARRIVAL_TOL_S, (e["arrival"] - record.written) * 1e3
    assert record.ttft == pytest.approx(record.first_token - record.written)
    server_ttft = e["first_sent"] - e["arrival"]
    assert server_ttft - CLOCK_TOL_S <= record.ttft <= server_ttft + 2 * ARRIVAL_TOL_S, (
        f"client TTFT {record.ttft * 1e3:.1f} ms, server's {server_ttft * 1e3:.1f} ms")
    sends = {n: t for t, n in e["send_times"]}
    for at, n in zip(record.chunk_times, record.chunk_tokens, strict=True):  # stamped at or after each send
        assert sends[n] - CLOCK_TOL_S <= at <= sends[n] + ARRIVAL_TOL_S, (n, (at - sends[n]) * 1e3)
