"""The one JSONL spool under both the record store and the ledger drain (metrics/plugin/spool.py): the drain's
ledger entries read back exactly, a full disk loses none of them, threads appending while it is read never
yield half a line, and a spool of our own is gone once discarded (test_record_store.py tries the same file
with stream records)."""

from __future__ import annotations

import logging
import random
import threading

from stopstorm.metrics.plugin.spool import JsonlSpool
from stopstorm.simulator.ledger import LedgerEntry


def _entry(i: int, rng: random.Random) -> LedgerEntry:
    t = 5000.0 + rng.random() * 100
    return LedgerEntry(request_id=f"chatcmpl-{i}", endpoint="chat", stream=True, prompt_tokens=rng.randint(1, 900),
                       max_tokens=256, target_tokens=200, arrival=t, scheduled=t + rng.random() / 7,
                       first_token=t + 0.1 + rng.random() / 3, freed=t + 2 + rng.random(),
                       generated_tokens=rng.randint(0, 256), send_times=[[t + k / 3, float(k)] for k in range(5)],
                       finish_reason=rng.choice(["stop", "length", "abort"]), error=None if i % 4 else "é\n\u2028")


def _ledger_spool(**kw: object) -> JsonlSpool[LedgerEntry]:
    return JsonlSpool("the ledger spool", LedgerEntry.to_json, LedgerEntry.from_json, **kw)  # type: ignore[arg-type]


def test_ledger_entries_read_back_field_for_field(tmp_path):
    rng = random.Random(3)
    made = [_entry(i, rng) for i in range(300)]
    spool = _ledger_spool(path=tmp_path / "ledger.jsonl")
    for e in made:
        spool.append(e)
    back = list(spool)
    assert back == made  # dataclass equality: every field, every float exactly
    assert spool.written == len(spool) == 300 and spool.kept


def test_a_full_disk_keeps_every_entry_in_memory_said_once(caplog):
    rng = random.Random(4)
    made = [_entry(i, rng) for i in range(7)]
    spool = _ledger_spool(path="/dev/full")
    with caplog.at_level(logging.ERROR, logger="stopstorm"):
        for e in made:
            spool.append(e)
    assert list(spool) == made and spool.written == 0 and len(spool) == 7
    said = [m for m in caplog.messages if "the ledger spool /dev/full failed" in m]
    assert len(said) == 1, caplog.messages


def test_threads_appending_while_it_is_read_never_yield_half_a_line(tmp_path):
    """The drain's greenlet and the report's read take turns; the record store is also fed from threads (the
    openai-async bridge): every read meanwhile gives whole items in order, the last read all of them."""
    rng = random.Random(5)
    made = [[_entry(t * 1000 + i, rng) for i in range(400)] for t in range(4)]
    spool = _ledger_spool(temp_prefix="test")
    seen: list[int] = []

    def feed(items: list[LedgerEntry]) -> None:
        for e in items:
            spool.append(e)

    threads = [threading.Thread(target=feed, args=(items,)) for items in made]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        got = list(spool)  # each one decoded from a whole line, or this raises
        seen.append(len(got))
        for items in made:  # each thread's own entries come in the order it wrote them
            mine = [e for e in got if e.request_id in {x.request_id for x in items}]
            assert mine == items[: len(mine)]
    for th in threads:
        th.join()
    assert sorted(e.request_id for e in spool) == sorted(e.request_id for items in made for e in items)
    assert seen == sorted(seen)  # a later read never has fewer
    path = spool.path
    assert path is not None and path.name.startswith("stopstorm-test-")
    spool.discard()
    assert not path.exists() and spool.path is None and list(spool) == []


def test_memory_only_keeps_items_and_readies_them(tmp_path):
    readied: list[str] = []
    spool = JsonlSpool("x", LedgerEntry.to_json, LedgerEntry.from_json,
                       to_memory=lambda e: readied.append(e.request_id))
    rng = random.Random(6)
    made = [_entry(i, rng) for i in range(3)]
    for e in made:
        spool.append(e)
    assert spool.path is None and spool.written == 0 and list(spool) == made
    assert readied == [e.request_id for e in made]
