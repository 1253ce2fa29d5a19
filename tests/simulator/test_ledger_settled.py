"""The ledger read as a run goes (`GET /stopstorm/ledger/settled`), and bounded once read.

An entry must be handed out only when nothing about it can change (freed by the engine *and* its response
done: a close's abort comes a step after the response ends, a finished stream's last chunks are sent after the
engine freed it), exactly once, in settle order; asking after N acknowledges 1..N, which a simulator under
`--forget-read-ledger` drops, so its memory stays flat however long the run. The drain that stopstorm runs
(metrics/plugin/ledger_drain.py) must give the report the same ledger a whole read gives.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import RawStream, SimHandle, SimPool, chat_body, wait_until

from stopstorm.metrics.plugin.ledger_drain import LedgerDrain
from stopstorm.simulator.ledger import Ledger, LedgerEntry

CHAT = "/v1/chat/completions"
# 20 ms steps, not FAST's 5: a stream closed after 3 of its 12 tokens must be closed before the engine makes the
# other 9 (at 5 ms a slower VM once read 3 and closed after all 12 were made: `length`, not `abort`, 2026-12-04)
SIM = ("--step-base-ms", "20", "--max-num-seqs", "4", "--output-len", "fixed:12")


def _entry(rid: str, arrival: float = 0.0) -> LedgerEntry:
    return LedgerEntry(request_id=rid, endpoint="chat", stream=True, prompt_tokens=3, max_tokens=12,
                       target_tokens=12, arrival=arrival)


def _settle(ledger: Ledger, rid: str) -> None:
    entry = ledger.entries[rid]
    entry.freed = time.monotonic()
    ledger.freed(entry)
    ledger.responded(entry)


def test_an_entry_settles_once_when_both_freed_and_answered() -> None:
    ledger = Ledger()
    a, b = _entry("a", 1.0), _entry("b", 2.0)
    ledger.add(a)
    ledger.add(b)
    a.freed = 3.0
    ledger.freed(a)  # the engine let it go; its last chunks are still being sent
    assert ledger.settled_after(0, 10) == ([], 0) and ledger.unsettled_count == 2
    ledger.responded(a)
    ledger.responded(b)  # its client is gone; the engine aborts it a step later
    assert ledger.settled_after(0, 10) == ([a], 1)
    b.freed = 4.0
    ledger.freed(b)
    ledger.freed(b)  # told twice: still handed out once
    ledger.responded(b)
    assert ledger.settled_after(0, 10) == ([a, b], 2)
    assert ledger.in_flight() == [] and ledger.settled_count == 2


def test_pages_acknowledge_and_a_forgetting_ledger_drops_only_what_was_read() -> None:
    for forget in (False, True):
        ledger = Ledger(forget_read=forget)
        for i in range(10):
            ledger.add(_entry(f"r{i}", float(i)))
        for i in range(10):
            _settle(ledger, f"r{i}")
        ledger.add(_entry("flying", 11.0))
        page, last = ledger.settled_after(0, 4)
        assert [e.request_id for e in page] == ["r0", "r1", "r2", "r3"] and last == 4
        assert len(ledger) == 11  # nothing acknowledged yet: the page may have been lost on the way
        page, last = ledger.settled_after(4, 100)  # "I hold 1..4"
        assert [e.request_id for e in page] == [f"r{i}" for i in range(4, 10)] and last == 10
        assert len(ledger) == (7 if forget else 11) and ledger.forgotten == (4 if forget else 0)
        page, last = ledger.settled_after(4, 100)  # the same question again (a lost answer): the same answer
        assert [e.request_id for e in page] == [f"r{i}" for i in range(4, 10)] and last == 10
        assert ledger.settled_after(10, 100) == ([], 10)
        assert [e.request_id for e in ledger] == (["flying"] if forget else [*(f"r{i}" for i in range(10)),
                                                                            "flying"])
        assert [e.request_id for e in ledger.in_flight()] == ["flying"]
        assert ledger.settled_after(25, 10) == ([], 25)  # beyond what settled: nothing, and nothing dropped
        assert ledger.unsettled_count == 1


def test_a_reader_ahead_of_the_ledger_acknowledges_nothing() -> None:
    """A cursor from another server (or from this one before a restart) is beyond what settled here: a
    forgetting ledger must not take it as "I hold everything" and drop entries nobody read."""
    ledger = Ledger(forget_read=True)
    for i in range(5):
        ledger.add(_entry(f"r{i}", float(i)))
        _settle(ledger, f"r{i}")
    assert ledger.settled_after(500, 10) == ([], 500)
    assert len(ledger) == 5 and ledger.forgotten == 0
    page, last = ledger.settled_after(0, 10)
    assert len(page) == 5 and last == 5


def _traffic(sim: SimHandle, n: int, seed: int) -> dict[str, str]:
    """`n` streams, four at a time: read to the end, closed after a few chunks or refused by a fault header;
    returns each request id's fate."""
    rng = random.Random(seed)
    fates = {f"settled-{seed}-{i}": rng.choice(("full", "close", "refused")) for i in range(n)}

    def one(rid: str) -> None:
        fate = fates[rid]
        if fate == "refused":
            r = httpx.post(sim.url + CHAT, json=chat_body(12), headers={"X-Request-Id": rid,
                                                                      "x-stopstorm-fault": "status:503"})
            assert r.status_code == 503
            return
        with RawStream(sim, CHAT, chat_body(12), request_id=rid) as s:
            if fate == "close":
                s.read_events(3)
                s.close()
            else:
                s.read_to_end()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, fates))
    return {f"chatcmpl-{rid}": fate for rid, fate in fates.items()}


def test_drain_gives_the_ledger_a_whole_read_gives(sim_pool: SimPool) -> None:
    """Against a simulator that keeps everything, the drained snapshot and `GET /stopstorm/ledger` are the
    same entries with the same marks, in the same order."""
    sim = sim_pool.fresh(*SIM)
    drain = LedgerDrain.open(sim.url, after=_settled_now(sim))
    assert drain is not None
    try:
        fates = _traffic(sim, 24, seed=1)
        drain.poll()  # some read mid-way, the rest at the end
        snapshot = drain.settled(5.0)
        assert snapshot is not None
        whole = sorted(sim.ledger()["requests"], key=lambda e: (e["arrival"], e["request_id"]))
        assert [e.to_json() for e in sorted(snapshot.entries, key=lambda e: (e.arrival, e.request_id))] == whole
        assert {e.request_id for e in snapshot.entries} == set(fates)
        for e in snapshot.entries:
            assert e.freed is not None
            assert (e.finish_reason == "abort") == (fates[e.request_id] == "close"), e
            assert (e.status_code == 503) == (fates[e.request_id] == "refused"), e
    finally:
        drain.discard()
    assert drain.path is None


def _settled_now(sim: SimHandle) -> int:
    return int(sim.http.get("/stopstorm/ledger/settled", params={"after": 0, "limit": 1}).json()["settled"])


def test_a_forgetting_simulator_holds_only_what_nobody_read(sim_pool: SimPool) -> None:
    """Under --forget-read-ledger, after each read the ledger holds at most the entries of the last page and
    those in flight; every request is drained exactly once and nothing is lost."""
    sim = sim_pool.fresh(*SIM, "--forget-read-ledger")
    drain = LedgerDrain.open(sim.url, after=_settled_now(sim))
    assert drain is not None
    held: list[int] = []
    fates: dict[str, str] = {}
    try:
        for burst in range(6):
            fates |= _traffic(sim, 20, seed=10 + burst)
            drain.poll()
            drain.poll()  # acknowledges the page before: only in-flight ones may stay
            held.append(len(sim.ledger()["requests"]))
        snapshot = drain.settled(5.0)
        assert snapshot is not None
        ids = [e.request_id for e in snapshot.entries]
        assert len(ids) == len(set(ids)) == 120 and set(ids) == set(fates)
        assert all(e.freed is not None for e in snapshot.entries)
        assert max(held) <= 4, held  # at most --max-num-seqs in flight; never the whole run
        doc = sim.http.get("/stopstorm/ledger/settled", params={"after": drain.after}).json()
        assert doc["forget_read"] is True and doc["forgotten"] >= 120 and sim.ledger()["requests"] == []
    finally:
        drain.discard()


def test_in_flight_entries_come_with_the_final_read_and_settle_later(sim_pool: SimPool) -> None:
    """A stream still running at the report's read is in the snapshot (as it is then), not lost, and a
    reader waiting for it to settle gets it once it has."""
    sim = sim_pool.fresh(*(a for a in SIM if a != "fixed:12"), "fixed:400", "--forget-read-ledger")
    drain = LedgerDrain.open(sim.url, after=_settled_now(sim))
    assert drain is not None
    s = RawStream(sim, CHAT, chat_body(400), request_id="long-one")
    try:
        s.read_events(2)
        wait_until(lambda: sim.entry("chatcmpl-long-one") is not None, what="the long stream in the ledger")
        snapshot = drain.snapshot()
        assert snapshot is not None
        (entry,) = [e for e in snapshot.entries if e.request_id == "chatcmpl-long-one"]
        assert entry.freed is None
        s.close()
        snapshot = drain.settled(5.0)
        assert snapshot is not None
        (entry,) = [e for e in snapshot.entries if e.request_id == "chatcmpl-long-one"]
        assert entry.freed is not None and entry.finish_reason == "abort"
        assert len(drain) == 1
    finally:
        s.__exit__()
        drain.discard()


def test_a_drain_with_another_server_s_cursor_reads_this_one_from_its_start(sim_pool: SimPool) -> None:
    """A web UI run may point at another simulator than the run before (or the same URL, restarted): the
    earlier cursor is beyond what settled there, so the drain starts from 0 and loses none of its entries."""
    sim = sim_pool.fresh(*SIM, "--forget-read-ledger")
    fates = _traffic(sim, 5, seed=7)
    wait_until(lambda: all(e["freed"] is not None for e in sim.entries().values()), what="the five settled")
    settled = _settled_now(sim)
    drain = LedgerDrain.open(sim.url, after=settled + 10_000)
    assert drain is not None
    try:
        snapshot = drain.settled(5.0)
        assert snapshot is not None and set(fates) <= {e.request_id for e in snapshot.entries}
    finally:
        drain.discard()


def test_a_server_without_the_endpoint_is_read_whole() -> None:
    """Real vLLM and older simulators have no /stopstorm/ledger/settled: no drain (the report reads the
    ledger whole, as before), and no spool is made."""
    assert LedgerDrain.open("http://127.0.0.1:9") is None  # nothing listens on the discard port


@pytest.mark.parametrize("bad", ["-5", "abc"])
def test_the_endpoint_refuses_or_clamps_bad_cursors(sim_pool: SimPool, bad: str) -> None:
    sim = sim_pool.fresh(*SIM)
    r = sim.http.get("/stopstorm/ledger/settled", params={"after": bad})
    if bad == "abc":
        assert r.status_code == 422
    else:
        assert r.status_code == 200 and r.json()["next"] >= 0 and isinstance(r.json()["requests"], list)


def test_a_server_that_stops_answering_keeps_what_was_read(tmp_path) -> None:
    """The simulator gone mid-run: the drain says so (a failed read, counted) and keeps every entry it had
    read; it never invents the rest."""
    sim = SimHandle(SIM, log_path=str(tmp_path / "sim.log"))
    drain = None
    try:
        drain = LedgerDrain.open(sim.url)
        assert drain is not None
        fates = _traffic(sim, 6, seed=99)
        wait_until(lambda: drain.poll() is not None and len(drain) == 6, what="the six entries drained")
    finally:
        sim.close()
    try:
        assert drain.poll() is None and drain.failures == 1 and "/stopstorm/ledger/settled" in drain.last_error
        assert drain.settled(0.2) is None
        assert {e.request_id for e in drain.entries()} == set(fates)
    finally:
        drain.discard()
