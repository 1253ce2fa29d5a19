"""Locust master/worker mode: the master's report holds every worker's streams, exactly, against the ledger.

Real processes on loopback: a simulator, a Locust master and two workers (and `--processes 2`), running the
seeded, bounded work of tests/seeded_locustfile.py (U users × ITERATIONS streams each, the same in any
process). Truth is the simulator's ledger: the report's totals must equal it, and equal a single-process run
of the same work. With 40 ms steps a `close` Stop is freed within a step (never a zombie, nothing wasted) and
a `none` Stop reads on for 7 more tokens (280 ms: always a zombie), so the split is exact, not statistical.
The unit tests at the end cover the batching and the wire format without processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from conftest import wait_until
from locust_tools import ROOT, figure, free_port

from stopstorm.metrics.plugin.distributed import RecordCollector, RecordShipper, _WorkerTally
from stopstorm.metrics.record import StreamRecord

LOCUSTFILE = str(ROOT / "tests" / "seeded_locustfile.py")
USERS = 4
ITERATIONS = 3
SIM_ARGS = ("--step-base-ms", "40", "--max-num-seqs", "2")
WORK = ["--headless", "-u", str(USERS), "-r", str(USERS), "-t", "7s", "--think-time", "0", "--ignore-eos",
        "--max-tokens", "10", "--stop-probability", "0.5", "--stop-at", "tokens:fixed:3",
        "--close-mix", "close:1,none:1", "--only-summary", "--loglevel", "INFO"]
OVERALL = ("streams", "stopped", "failed", "aborted", "wasted_tokens", "zombies", "goodput_tokens",
           "freed_tokens")


def _env() -> dict[str, str]:
    # Seed 10: each user draws a `close` Stop, a `none` Stop and a stream read to the end.
    return {**os.environ, "PYTHONPATH": str(ROOT), "STOPSTORM_TEST_ITERATIONS": str(ITERATIONS),
            "STOPSTORM_TEST_SEED": "10", "PYTHONUNBUFFERED": "1"}


def _locust(*args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "locust", "-f", LOCUSTFILE, *args], cwd=ROOT, env=_env(),
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _finish(procs: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    """Wait for our own processes; any still running after `timeout` is killed by its PID (and fails)."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


def _overall(report: dict[str, Any]) -> dict[str, Any]:
    figures = report["overall"]["figures"]
    return {name: figures[name]["value"] for name in OVERALL}


def _ledger_totals(entries: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {"requests": len(entries),
            "aborts": sum(e["finish_reason"] == "abort" for e in entries.values()),
            "generated": sum(e["generated_tokens"] for e in entries.values()),
            "sent": sum(e["sent_tokens"] for e in entries.values())}


def _check_against_ledger(report: dict[str, Any], totals: dict[str, int]) -> None:
    """The report's figures are the ledger's, to the stream and the token."""
    o = _overall(report)
    assert totals["requests"] == USERS * ITERATIONS  # all the seeded work was done
    assert o["streams"] == totals["requests"]
    assert figure(report, "run", "unmatched_requests") == 0 and figure(report, "run", "unjoined_streams") == 0
    assert o["failed"] == 0
    assert o["aborted"] == totals["aborts"] == figure(report, "run", "ledger_aborts")
    # Every generated token was either read by a user or wasted: a lost or doubled record breaks this.
    assert o["goodput_tokens"] + o["wasted_tokens"] == totals["generated"]
    # A `close` Stop is an abort freed within a step; every `none` Stop is a zombie.
    assert o["zombies"] == o["stopped"] - o["aborted"]
    assert 0 < o["aborted"] < o["stopped"] < o["streams"]


def _run_single(sim: Any, tmp_path: Path) -> dict[str, Any]:
    report = tmp_path / "single.json"
    p = _locust(*WORK, "--host", sim.url, "--stopstorm-report", str(report), log=tmp_path / "single.log")
    _finish([p])
    assert p.returncode == 0, (tmp_path / "single.log").read_text()[-3000:]
    return json.loads(report.read_text())


def _run_master_workers(sim: Any, tmp_path: Path, kill_one_after: float | None = None, *extra: str
                        ) -> tuple[dict[str, Any], str]:
    port = str(free_port())
    report = tmp_path / "master.json"
    master_log = tmp_path / "master.log"
    master = _locust(*WORK, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
                     "--expect-workers", "2", "--host", sim.url, "--stopstorm-report", str(report), *extra,
                     log=master_log)
    workers = [_locust("--worker", "--master-host", "127.0.0.1", "--master-port", port,
                       log=tmp_path / f"worker{i}.log") for i in range(2)]
    if kill_one_after is not None:
        wait_until(lambda: sim.entries(), timeout=30, interval=0.05, what="the first request")
        time.sleep(kill_one_after)
        os.kill(workers[0].pid, signal.SIGKILL)
    _finish([master, *workers], timeout=90)
    text = master_log.read_text()
    assert master.returncode == 0, text[-3000:]
    return json.loads(report.read_text()), text


@pytest.fixture(scope="module")
def single_run(sim_pool, tmp_path_factory) -> tuple[dict[str, Any], dict[str, int]]:
    """One single-process run of the seeded work: its report and its ledger's totals."""
    sim = sim_pool.fresh(*SIM_ARGS)
    single = _run_single(sim, tmp_path_factory.mktemp("single"))
    return single, _ledger_totals(sim.wait_idle())


@pytest.mark.slow
def test_master_and_two_workers_equal_the_ledger_and_a_single_process(sim_pool, single_run, tmp_path):
    single, single_ledger = single_run
    _check_against_ledger(single, single_ledger)

    sim = sim_pool.fresh(*SIM_ARGS)
    # Workers hold their records for a minute: everything reaches the master in the final flush at stop.
    distributed, _ = _run_master_workers(sim, tmp_path, None, "--records-interval", "60")
    distributed_ledger = _ledger_totals(sim.wait_idle())
    _check_against_ledger(distributed, distributed_ledger)

    assert distributed_ledger == single_ledger
    assert _overall(distributed) == _overall(single)
    meta = distributed["meta"]["distributed"]
    assert meta["incomplete"] == [] and meta["bad_records"] == 0
    assert meta["records"] == USERS * ITERATIONS
    assert len(meta["workers"]) == 2
    for w in meta["workers"].values():  # both did work, and said so; one host: no clock shift
        assert w["final"] and w["records"] == w["claimed_sent"] > 0 and w["clock_shift_s"] == 0.0
        assert w["drained"] == w["records"]  # all of it in flight at stop, none lost
    assert "distributed" not in single["meta"]


@pytest.mark.slow
def test_processes_2_starts_one_simulator_and_matches_a_single_process(single_run, tmp_path):
    """`--processes 2` with no --host: the master starts the embedded simulator, the forked workers use it."""
    single, _ = single_run

    report = tmp_path / "processes.json"
    log = tmp_path / "processes.log"
    port = str(free_port())  # not Locust's default 5557: another run on this machine may hold it
    p = _locust(*WORK, "--processes", "2", "--master-bind-port", port, "--master-port", port,
                "--sim-args", " ".join(SIM_ARGS[:2]), "--stopstorm-report", str(report), log=log)
    _finish([p], timeout=90)
    text = log.read_text()
    assert p.returncode == 0, text[-3000:]
    assert text.count("started the embedded simulator at") == 1, text[-3000:]
    doc = json.loads(report.read_text())
    assert doc["meta"]["host"].startswith("http://127.0.0.1:")
    assert "simulator ledger" in doc["sources"]
    assert figure(doc, "run", "unmatched_requests") == 0 and figure(doc, "run", "unjoined_streams") == 0
    assert _overall(doc) == _overall(single)
    meta = doc["meta"]["distributed"]
    assert meta["incomplete"] == [] and len(meta["workers"]) == 2
    assert meta["records"] == USERS * ITERATIONS


@pytest.mark.slow
def test_a_worker_that_dies_is_reported_and_the_report_is_still_written(sim_pool, tmp_path):
    sim = sim_pool.fresh(*SIM_ARGS)
    doc, _ = _run_master_workers(sim, tmp_path, kill_one_after=1.5)
    entries = sim.wait_idle()
    meta = doc["meta"]["distributed"]
    assert len(meta["incomplete"]) == 1
    dead = meta["workers"][meta["incomplete"][0]]
    assert not dead["final"] and dead["state"] in ("missing", "gone")
    assert dead["records"] == dead["claimed_sent"]  # what it had sent arrived
    live = [w for wid, w in meta["workers"].items() if wid not in meta["incomplete"]]
    assert len(live) == 1 and live[0]["final"]
    # Every request the server saw is either a reported stream or named as unreported: nothing doubled.
    streams = _overall(doc)["streams"]
    assert streams == meta["records"]
    assert streams + figure(doc, "run", "unmatched_requests") == len(entries)
    assert figure(doc, "run", "unjoined_streams") == 0


# --- without processes -------------------------------------------------------------------------------------


def _record(i: int) -> StreamRecord:
    return StreamRecord(stack="requests", close_mode="close", endpoint="chat", request_id=f"r{i}",
                        stop_plan="tokens:3", wall_start=1000.0 + i, sent=10.0 + i, headers=10.1 + i,
                        first_token=10.2 + i, chunk_times=[10.2 + i, 10.3 + i], chunk_tokens=[1, 2], stop=10.3 + i,
                        tokens_at_stop=2, closed=10.31 + i, tokens=2, usage_tokens=2, status=200)


def test_wire_round_trip_and_rebasing():
    rec = _record(1)
    wire = rec.to_wire()
    assert set(wire) >= {"request_id", "chunk_times", "stop"} and "ttft" not in wire
    assert StreamRecord.from_wire(wire) == rec
    moved = StreamRecord.from_wire(wire, shift=100.0)
    assert moved.sent == rec.sent + 100.0 and moved.chunk_times == [t + 100.0 for t in rec.chunk_times]
    assert moved.wall_start == rec.wall_start and moved.ended is None
    assert moved.ttft == pytest.approx(rec.ttft)


def test_a_compacted_record_keeps_its_marks_on_the_wire_and_in_json():
    rec = _record(2)
    wire, as_json, itl = rec.to_wire(), orjson.loads(orjson.dumps(rec.to_json())), rec.itl
    rec.compact()  # what the collector does to every record it keeps for the report
    assert type(rec.chunk_times).__name__ == type(rec.chunk_tokens).__name__ == "array"
    assert rec.to_wire() == wire and orjson.loads(orjson.dumps(rec.to_json())) == as_json and rec.itl == itl
    assert msgpack.unpackb(msgpack.packb(rec.to_wire())) == wire  # Locust's message encoding


def test_batches_are_bounded_and_a_final_flush_delivers_everything():
    sent: list[dict[str, Any]] = []
    shipper = RecordShipper(lambda kind, data: sent.append(data), batch_records=4)
    got: list[StreamRecord] = []
    collector = RecordCollector(got.append)
    for i in range(10):
        shipper.add(_record(i))
    assert [len(b["records"]) for b in sent] == [4, 4] and not any(b["final"] for b in sent)
    shipper.flush(final=True)
    assert [len(b["records"]) for b in sent] == [4, 4, 2] and sent[-1]["final"] and sent[-1]["sent"] == 10
    for batch in sent:
        collector.receive("w1", batch)
    assert [r.request_id for r in got] == [f"r{i}" for i in range(10)]
    meta = collector.meta(None).to_json()
    assert meta["incomplete"] == [] and meta["workers"]["w1"]["records"] == 10


def test_records_from_another_host_are_rebased_onto_this_hosts_clock():
    got: list[StreamRecord] = []
    collector = RecordCollector(got.append)
    collector.workers["far"] = _WorkerTally()  # as drain() leaves it, before the worker's first batch
    offset_here = time.time() - time.monotonic()
    # The far host booted 1000 s later: its monotonic clock reads 1000 s less at the same wall time.
    collector.receive("far", {"records": [_record(0).to_wire()], "sent": 1, "final": True,
                              "clock_offset": offset_here + 1000.0})
    collector.receive("near", {"records": [_record(0).to_wire()], "sent": 1, "final": True,
                               "clock_offset": offset_here + 0.001})
    assert got[0].sent == pytest.approx(_record(0).sent + 1000.0, abs=0.01)
    assert got[1].sent == _record(0).sent  # the same host: noise, not a shift


def test_a_batch_is_also_bounded_by_chunk_marks():
    sent: list[dict[str, Any]] = []
    shipper = RecordShipper(lambda kind, data: sent.append(data), batch_records=100, batch_chunks=5)
    for i in range(4):  # two chunk marks each: the third record makes six
        shipper.add(_record(i))
    assert [len(b["records"]) for b in sent] == [3]
    shipper.flush()
    assert [len(b["records"]) for b in sent] == [3, 1] and sent[-1]["sent"] == 4


def test_a_failed_send_keeps_the_records_for_the_next_try():
    sent: list[dict[str, Any]] = []
    fail = [True]

    def send(_kind: str, data: dict[str, Any]) -> None:
        if fail[0]:
            raise OSError("connection reset")
        sent.append(data)

    shipper = RecordShipper(send, batch_records=2)
    for i in range(3):
        shipper.add(_record(i))  # a full batch is tried at the second and third add, and kept
    shipper.flush()
    assert sent == [] and shipper.errors == 3 and shipper.sent == 0
    fail[0] = False
    shipper.flush()
    assert [len(b["records"]) for b in sent] == [2, 1] and sent[-1]["final"] and sent[-1]["sent"] == 3
    assert [r["request_id"] for b in sent for r in b["records"]] == ["r0", "r1", "r2"]


def test_a_worker_without_its_final_batch_is_incomplete():
    collector = RecordCollector(lambda _r: None)
    collector.receive("w1", {"records": [_record(0).to_wire()], "sent": 1, "final": False})
    collector.receive("w2", {"records": [_record(1).to_wire()], "sent": 2, "final": True})  # one went missing
    collector.receive("w2", {"records": [{"bogus": 1}], "sent": 3, "final": True})
    meta = collector.meta(None).to_json()
    assert meta["incomplete"] == ["w1", "w2"] and meta["bad_records"] == 1
    assert meta["workers"]["w2"] == {"records": 1, "batches": 2, "claimed_sent": 3, "final": True, "state": "gone",
                                     "clock_shift_s": 0.0, "drained": 0}


def test_a_bad_records_interval_is_refused_naming_the_option(tmp_path):
    log = tmp_path / "bad.log"
    p = _locust("--headless", "-u", "1", "-t", "2s", "--records-interval", "0", "--sim-args", "--step-base-ms 5",
                "--stopstorm-report", str(tmp_path / "r.json"), log=log)
    _finish([p], timeout=60)
    assert p.returncode == 2
    assert "--records-interval must be > 0 and <= 1000000 (seconds, finite), got 0.0" in log.read_text()
    assert not (tmp_path / "r.json").exists()
