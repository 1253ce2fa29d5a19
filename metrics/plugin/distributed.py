"""Locust master/worker mode: every worker's stream records reach the master, exactly once, so the master's
accounting is the same, to the token, however the load was spread.

A worker keeps no report of its own: its records go to the master in bounded batches (at most `BATCH_RECORDS`
records or `BATCH_CHUNKS` chunk marks each, at least every `SEND_INTERVAL_S`) as Locust custom messages, which
ride the same ordered connection as Locust's own. The master feeds each arriving record to the same collection
function single-process records go through, and alone scrapes /metrics, reads the ledger and writes the report.

Nothing is lost at the end: when the master stops the test (run-time limit, web UI, Ctrl-C, SIGTERM) it asks
every live worker to stop its users and send what it still holds, marked final with the number it sent in
all, and waits for those answers (bounded by the stop timeout) before its own end-of-test work, so the
scraper's last reading and the report come after the last stream. A worker that died, or never answered, is
named in the report's `meta.workers` with what it had sent; the report is written all the same, and the
simulator's ledger shows its unreported streams (`unmatched_requests`).

Monotonic marks are re-based when a worker runs on another host (its wall-minus-monotonic offset differs from
the master's by more than `SAME_HOST_TOLERANCE_S`): through wall time, as exact as the hosts' clock sync.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from locust import events
from locust.env import Environment
from locust.runners import STATE_MISSING, MasterRunner, WorkerRunner

from stopstorm.metrics.plugin import options
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.report.model import DistributedInfo, WorkerInfo

__all__ = ["BATCH_CHUNKS", "BATCH_RECORDS", "SEND_INTERVAL_S", "RecordCollector", "RecordShipper", "install",
           "workers_meta"]

_log = logging.getLogger("stopstorm")

MSG_RECORDS = "stopstorm_records"  # worker → master: {"records": [...], "batch": n, "sent": n, "final": bool, ...}
MSG_FLUSH = "stopstorm_flush"  # master → worker: stop your users and send what you hold, marked final
BATCH_RECORDS = 200  # records per message at most
BATCH_CHUNKS = 50_000  # and chunk marks (two numbers each, ~18 bytes packed): under ~1 MB a message
SEND_INTERVAL_S = 1.0  # a partial batch waits at most this long
FINAL_WAIT_S = 10.0  # on top of the stop timeout, how long the master waits for every worker's final batch
# Two processes on one host read one CLOCK_MONOTONIC: their wall-minus-monotonic offsets differ by noise only.
SAME_HOST_TOLERANCE_S = 0.05



@dataclass
class _Role:
    """This process's part in master/worker mode: a worker's outbox or a master's collection (or neither)."""

    shipper: RecordShipper | None = None
    collector: RecordCollector | None = None




def _clock_offset() -> float:
    return time.time() - time.monotonic()


class RecordShipper:
    """A worker's outbox: records in, bounded batches out to the master."""

    def __init__(self, send: Callable[[str, dict[str, Any]], None], batch_records: int = BATCH_RECORDS,
                 interval_s: float = SEND_INTERVAL_S, batch_chunks: int = BATCH_CHUNKS) -> None:
        self._send = send
        self._batch_records = batch_records
        self._interval_s = interval_s
        self._pending: list[dict[str, Any]] = []
        self._pending_chunks = 0
        self._batch_chunks = batch_chunks
        self.sent = 0  # records handed to the connection, in all
        self.batches = 0
        self.errors = 0
        self._greenlet: gevent.Greenlet | None = None

    def add(self, record: StreamRecord) -> None:
        self._pending.append(record.to_wire())
        self._pending_chunks += len(record.chunk_times)
        if len(self._pending) >= self._batch_records or self._pending_chunks >= self._batch_chunks:
            self._send_batch(final=False)

    def reset(self) -> None:
        """A new run (the web UI's next Start): its counts start from zero, as the master's do."""
        self.sent = self.batches = 0

    def start(self, interval_s: float | None = None) -> RecordShipper:
        if interval_s is not None:
            self._interval_s = interval_s
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._loop)
        return self

    def _loop(self) -> None:
        while True:
            gevent.sleep(self._interval_s)
            if self._pending:
                self._send_batch(final=False)

    def flush(self, final: bool = True) -> None:
        """Send what is held (possibly nothing), marked final: the master then knows it has everything."""
        if not self._send_batch(final=final):
            return
        while self._pending:  # more than one batch's worth: the rest, the last one final
            if not self._send_batch(final=final):
                return

    def _send_batch(self, final: bool) -> bool:
        """One batch from the front of what is held; on a failed send it is kept for the next try."""
        chunk, self._pending = self._pending[:self._batch_records], self._pending[self._batch_records:]
        self._pending_chunks = sum(len(r["chunk_times"]) for r in self._pending)
        last = final and not self._pending
        payload = {"records": chunk, "batch": self.batches, "sent": self.sent + len(chunk), "final": last,
                   "clock_offset": _clock_offset()}
        try:
            self._send(MSG_RECORDS, payload)
        except Exception as exc:  # the connection is Locust's (it reconnects): count it, keep the records
            self.errors += 1
            self._pending = chunk + self._pending
            self._pending_chunks = sum(len(r["chunk_times"]) for r in self._pending)
            _log.warning("stopstorm: sending %d records to the master failed (kept for the next try): %s",
                         len(chunk), exc)
            return False
        self.sent += len(chunk)
        self.batches += 1
        return True

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None


@dataclass
class _WorkerTally:
    records: int = 0
    batches: int = 0
    claimed_sent: int = 0  # the worker's own count of records sent, as of its latest batch
    final: bool = False  # its final batch arrived: nothing more is coming
    first_seen: float = 0.0
    last_seen: float = 0.0
    shift_s: float = 0.0  # added to its monotonic marks (0 on this host)
    drained: int = 0  # of its records, those that arrived once the master had asked for the final batches


class RecordCollector:
    """The master's inbox: batches in, each record handed to `sink` (the single-process collector)."""

    def __init__(self, sink: Callable[[StreamRecord], None]) -> None:
        self._sink = sink
        self.workers: dict[str, _WorkerTally] = {}
        self.bad_records = 0
        self._draining = False

    def reset(self) -> None:
        """A new run: every worker's tally starts from zero (its shipper's counts do too)."""
        self.workers.clear()
        self.bad_records = 0
        self._draining = False

    def receive(self, worker_id: str, data: dict[str, Any]) -> None:
        now = time.monotonic()
        tally = self.workers.get(worker_id)
        if tally is None:
            tally = self.workers[worker_id] = _WorkerTally(first_seen=now)
        if tally.batches == 0:  # its first batch (drain may have made the tally before anything arrived)
            offset = data.get("clock_offset")
            if isinstance(offset, (int, float)):
                diff = offset - _clock_offset()
                tally.shift_s = diff if abs(diff) > SAME_HOST_TOLERANCE_S else 0.0
        tally.last_seen = now
        tally.batches += 1
        tally.claimed_sent = max(tally.claimed_sent, int(data.get("sent", 0)))
        for raw in data.get("records", ()):
            try:
                record = StreamRecord.from_wire(raw, shift=tally.shift_s)
            except Exception as exc:  # a record from a different version: counted, the rest go on
                self.bad_records += 1
                _log.warning("stopstorm: a record from worker %s could not be read: %s", worker_id, exc)
                continue
            tally.records += 1
            tally.drained += self._draining
            self._sink(record)
        if data.get("final"):
            tally.final = True

    def drain(self, runner: MasterRunner, timeout_s: float) -> None:
        """Ask every live worker to stop and send what it holds; wait for their final batches, or `timeout_s`."""
        live = [c.id for c in runner.clients.all if c.state != STATE_MISSING]
        self._draining = True
        for worker_id in live:
            tally = self.workers.setdefault(worker_id, _WorkerTally(first_seen=time.monotonic()))
            tally.final = False  # a final from before this stop does not count
            try:
                runner.send_message(MSG_FLUSH, {}, client_id=worker_id)
            except Exception as exc:
                _log.warning("stopstorm: asking worker %s for its records failed: %s", worker_id, exc)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            waiting = [w for w in live if not self.workers[w].final
                       and w in runner.clients and runner.clients[w].state != STATE_MISSING]
            if not waiting:
                return
            gevent.sleep(0.02)
        _log.warning("stopstorm: no final batch from worker(s) %s after %.0f s; the report goes on without",
                     ", ".join(w for w in live if not self.workers[w].final), timeout_s)

    def meta(self, runner: MasterRunner | None) -> DistributedInfo:
        """Per worker what arrived, for the report: a worker without `final` died or never answered."""
        out: dict[str, WorkerInfo] = {}
        for worker_id, t in sorted(self.workers.items()):
            # "gone": it quit, or was removed after going missing
            state = runner.clients[worker_id].state if runner is not None and worker_id in runner.clients else "gone"
            out[worker_id] = WorkerInfo(t.records, t.batches, t.claimed_sent, t.final, state, t.shift_s, t.drained)
        return DistributedInfo(sum(t.records for t in self.workers.values()), self.bad_records,
                               tuple(sorted(w for w, t in self.workers.items()
                                            if not t.final or t.records < t.claimed_sent)), out)


TABLE = options.OptionTable("stopstorm master/worker", options=(
    options.Option("--records-interval", "seconds a worker may hold stream records before sending them to the master "
                   f"(default 1; a batch goes at once when it reaches {BATCH_RECORDS} records); what it holds at the "
                   "end is sent at stop", SEND_INTERVAL_S, options.seconds(above=True), float),
))


_ROLE = _Role()


options.register(TABLE, rank=80)


def _records_interval(environment: Environment) -> float:
    return float(getattr(environment.parsed_options, "records_interval", SEND_INTERVAL_S) or SEND_INTERVAL_S)


def install(environment: Environment, sink: Callable[[StreamRecord], None]) -> None:
    """Wire this process for its role: a worker ships its records, a master collects them into `sink`;
    a single process does nothing here."""
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        _install_worker(environment, runner)
    elif isinstance(runner, MasterRunner):
        _install_master(environment, runner, sink)


def _install_worker(environment: Environment, runner: WorkerRunner) -> None:
    shipper = RecordShipper(lambda kind, data: runner.send_message(kind, data))
    _ROLE.shipper = shipper

    def on_request(context: dict[str, Any] | None = None, **_kwargs: Any) -> None:
        if context and isinstance(context.get("record"), StreamRecord):
            shipper.add(context["record"])

    def on_test_start(**_kwargs: Any) -> None:
        shipper.reset()  # a new run: what the last one sent was flushed, marked final, at its stop
        shipper.start(_records_interval(environment))  # the master's value, from its spawn message

    def on_test_stop(**_kwargs: Any) -> None:
        # Locust's stats report first (it carries what rides on report_to_master: the self-monitor's summary),
        # then the final batch: the master writes its report at test_stop once every final batch is in, and the
        # one connection keeps the order, so the summary is there by then (Locust's own comes only at quit).
        send_stats = getattr(runner, "_send_stats", None)
        if send_stats is not None:
            try:
                send_stats()
            except Exception as exc:
                _log.warning("stopstorm: sending the last stats report to the master failed: %s", exc)
        shipper.flush(final=True)  # a stop from the master, or a quit: before Locust says it has stopped

    def on_flush(environment: Environment, msg: Any, **_kwargs: Any) -> None:
        runner.stop()  # users end (killed ones report nothing, as in one process); test_stop flushes
        shipper.flush(final=True)  # and again here, in case the runner was already stopped

    environment.events.request.add_listener(on_request)
    environment.events.test_start.add_listener(on_test_start)
    environment.events.test_stop.add_listener(on_test_stop)
    runner.register_message(MSG_FLUSH, on_flush, concurrent=True)


def _install_master(environment: Environment, runner: MasterRunner, sink: Callable[[StreamRecord], None]) -> None:
    collector = RecordCollector(sink)
    _ROLE.collector = collector

    def on_records(environment: Environment, msg: Any, **_kwargs: Any) -> None:
        collector.receive(msg.node_id, msg.data or {})

    def on_test_stopping(**_kwargs: Any) -> None:
        # Before the master's test_stop, so its last /metrics reading and the report follow the last stream.
        collector.drain(runner, float(environment.stop_timeout or 0.0) + FINAL_WAIT_S)

    runner.register_message(MSG_RECORDS, on_records)
    environment.events.test_start.add_listener(lambda **_kwargs: collector.reset())  # each run from zero
    environment.events.test_stopping.add_listener(on_test_stopping)


def workers_meta(environment: Environment | None) -> DistributedInfo | None:
    """What each worker sent, for the report's meta; None outside master/worker mode."""
    collector = _ROLE.collector
    if collector is None:
        return None
    runner = environment.runner if environment is not None else None
    return collector.meta(runner if isinstance(runner, MasterRunner) else None)


@events.quitting.add_listener
def _stop_shipping(**_kwargs: Any) -> None:
    shipper = _ROLE.shipper
    if shipper is not None:
        shipper.flush(final=True)
        shipper.stop()
