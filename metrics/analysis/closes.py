"""What became of each stopped stream whose client closed: it never reached the engine, it was aborted, or it
**ran on** (the engine registered it and never aborted it, so it generated to its end for nobody).

Why: against vLLM a close is acted on only if the request is still running when the server gets to it; a
stream that ends first (the close came, or was acted on, after its last token) is never aborted, and vLLM's
counters cannot tell it from a stream read to its end (docs/guides/missed-closes.md). Its only trace is in
vLLM's log: `Added request` and no abort line, and with `--enable-log-outputs` every chunk and `(streaming
complete)`. Those are zombies that no per-request metric shows; this module names them, per stream, from the
simulator's ledger (exact) or vLLM's log (metrics/truth/vllm_log.py), and turns them into figures.

Pure functions over `StreamRecord`s and a truth; no I/O. The classes:

- `never reached`: the server has no trace of the request (no ledger entry; no `Added` line): no work was done.
  vLLM registers nothing closed before its route handler has rendered the request (a few ms);
- `aborted`: the engine aborted it; its latency is Stop → slot freed (ledger) or Stop → abort line read (log);
- `ran on`: registered, and not aborted by the run's end. `ran_to_end` says whether the server confirmed it
  ran to its end (ledger: finish `length`/`stop`; log: `(streaming complete)`), None where the log cannot say
  (vLLM without `--enable-log-outputs`). A client that stopped reading but closed only after the stream's end
  is one: all its tokens were generated for nobody.

Stopped streams in close mode `none` (the client reads on, nobody looks) never close, so they are not among
the closed stops; they are classed `read on` and count only as zombies (`log_zombies`).

Tokens and slot-seconds of a ran-on stream come from what the server gives: the ledger's counts and marks; in
the log, `max_tokens` with `ignore_eos` from its `Received request` line (exact for a stream run to its end),
else its streaming deltas (a lower bound: a chunk may carry several tokens), and Stop (or `Added`) →
`(streaming complete)` read. Without those lines the slot time is a labelled estimate: tokens left at Stop ×
the stream's own mean inter-token gap (else the run's median), source `client estimate`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from stopstorm.metrics.figures import CLIENT_ESTIMATE, CLIENT_SOURCE, LEDGER_SOURCE, LOG_SOURCE, Figure, unknown
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.vllm_log import LogEvent, RequestLines, base_request_id
from stopstorm.simulator.ledger import LedgerEntry

__all__ = [
    "ABORTED",
    "NEVER_REACHED",
    "RAN_ON",
    "READ_ON",
    "CloseFigures",
    "CloseLog",
    "CloseOutcome",
    "abort_index",
    "classify_ledger",
    "classify_log",
    "close_figures",
    "log_zombies",
    "ran_on_finding",
]

NEVER_REACHED = "never reached the engine"
ABORTED = "aborted"
RAN_ON = "ran on"
READ_ON = "read on"  # close mode none: the client read to the end; not a close


class CloseLog(Protocol):
    """What the classifier needs of a vLLM log: `LogIndex` (saved lines) or a live `LineFollower`."""

    @property
    def aborted(self) -> Mapping[str, LogEvent]: ...

    @property
    def outputs_logged(self) -> bool: ...

    def lookup(self, request_id: str) -> tuple[LogEvent | None, LogEvent | None]: ...

    def request(self, request_id: str) -> RequestLines | None: ...


@dataclass(frozen=True, slots=True)
class CloseOutcome:
    """One stopped stream and what the server made of its close."""

    record: StreamRecord
    outcome: str  # NEVER_REACHED, ABORTED, RAN_ON or READ_ON
    source: str  # LEDGER_SOURCE or LOG_SOURCE
    registered: float | None = None  # the server took it: ledger arrival, `Added` line read
    abort_at: float | None = None  # aborted: slot freed (ledger) or abort line read (log)
    ran_to_end: bool | None = None  # ran on: confirmed to its end; None where the truth cannot say
    generated: int | None = None  # tokens the server generated for it; None unknown
    generated_how: str = ""
    slot_seconds: float | None = None  # ran on (and read on): slot time after Stop
    slot_how: str = ""  # the source of slot_seconds

    @property
    def abort_latency(self) -> float | None:
        stop = self.record.stop
        return None if self.abort_at is None or stop is None else self.abort_at - stop

    @property
    def closed(self) -> bool:
        return self.outcome != READ_ON

    @property
    def wasted(self) -> int | None:
        """Tokens generated that the user never read (None without a token count)."""
        return None if self.generated is None else max(0, self.generated - self.record.tokens_read)


def _sid(record: StreamRecord) -> str:
    if record.server_id:
        return record.server_id
    return ("chatcmpl-" if record.endpoint == "chat" else "cmpl-") + record.request_id


def _stopped(records: Iterable[StreamRecord]) -> list[StreamRecord]:
    return [r for r in records if r.stop is not None]


# --- the simulator's ledger --------------------------------------------------------------------------------------


def classify_ledger(records: Sequence[StreamRecord], entries: Mapping[str, LedgerEntry],
                    run_end: float | None = None) -> list[CloseOutcome]:
    """Every stopped stream by the ledger: no entry, `abort`, or anything else (ran on / read on)."""
    out = []
    for r in _stopped(records):
        e = entries.get(_sid(r))
        if e is None:
            out.append(CloseOutcome(r, NEVER_REACHED, LEDGER_SOURCE))
            continue
        if e.finish_reason == "abort" and r.close_mode != "none":
            out.append(CloseOutcome(r, ABORTED, LEDGER_SOURCE, registered=e.arrival, abort_at=e.freed,
                                    generated=e.generated_tokens, generated_how=LEDGER_SOURCE))
            continue
        end = e.freed if e.freed is not None else run_end
        assert r.stop is not None
        slot = (max(0.0, end - max(r.stop, e.scheduled)) if e.scheduled is not None and end is not None
                else 0.0 if e.scheduled is None else None)
        out.append(CloseOutcome(r, READ_ON if r.close_mode == "none" else RAN_ON, LEDGER_SOURCE,
                                registered=e.arrival, ran_to_end=e.finish_reason in ("length", "stop"),
                                generated=e.generated_tokens, generated_how=LEDGER_SOURCE, slot_seconds=slot,
                                slot_how=LEDGER_SOURCE))
    return out


# --- vLLM's log --------------------------------------------------------------------------------------------------


def abort_index(log: CloseLog) -> dict[str, LogEvent]:
    """Every abort event under its raw and its base id, the first read where several share one (vLLM 0.32
    logs `Aborted request(s) <id>-<hex>.` then `Request <id> aborted.` for one abort)."""
    out: dict[str, LogEvent] = {}
    for ev in log.aborted.values():
        for rid in (ev.request_id_raw, ev.request_id_base):
            held = out.get(rid)
            if held is None or ev.seen < held.seen:
                out[rid] = ev
    return out


def _first(found: Iterable[LogEvent | None]) -> LogEvent | None:
    seen = [ev for ev in found if ev is not None]
    return min(seen, key=lambda ev: ev.seen) if seen else None


def _gap(record: StreamRecord) -> float | None:
    """The stream's own mean inter-token gap, from its first and last token chunk; None under two."""
    t, n = record.chunk_times, record.chunk_tokens
    if len(t) < 2 or len(n) < 2 or n[-1] <= n[0]:
        return None
    return (t[-1] - t[0]) / (n[-1] - n[0])


def _median_gap(records: Iterable[StreamRecord]) -> float | None:
    gaps = [g for r in records if (g := _gap(r)) is not None]
    return statistics.median(gaps) if gaps else None


def classify_log(records: Sequence[StreamRecord], log: CloseLog) -> list[CloseOutcome]:
    """Every stopped stream by vLLM's log: no `Added`, an abort line, or neither by the end (ran on)."""
    aborts = abort_index(log)
    outputs = log.outputs_logged
    run_gap = _median_gap(records)
    out = []
    for r in _stopped(records):
        sid = _sid(r)
        ids = tuple(dict.fromkeys((sid, base_request_id(sid))))
        added = _first(log.lookup(i)[0] for i in ids)
        if added is None:
            out.append(CloseOutcome(r, NEVER_REACHED, LOG_SOURCE))
            continue
        aborted = _first(aborts.get(i) for i in ids)
        if aborted is not None and r.close_mode != "none":
            out.append(CloseOutcome(r, ABORTED, LOG_SOURCE, registered=added.seen, abort_at=aborted.seen))
            continue
        lines = next((rl for i in ids if (rl := log.request(i)) is not None), None)
        out.append(_ran_on(r, added, lines, outputs, run_gap))
    return out


def _ran_on(r: StreamRecord, added: LogEvent, lines: RequestLines | None, outputs: bool,
            run_gap: float | None) -> CloseOutcome:
    """A registered stream without an abort line: what the log gives of its tokens and slot time."""
    assert r.stop is not None
    outcome = READ_ON if r.close_mode == "none" else RAN_ON
    to_end = (lines is not None and lines.complete is not None) if outputs else None
    generated: int | None = None
    how = ""
    if lines is not None and lines.ignore_eos and lines.max_tokens is not None and to_end is not False:
        generated, how = lines.max_tokens, "max_tokens with ignore_eos (Received request line)"
    elif lines is not None and lines.deltas:
        generated, how = lines.deltas, "streaming delta lines (a lower bound: a chunk may carry several tokens)"
    start = max(r.stop, added.seen)
    if outcome == READ_ON and r.ended is not None:  # the client read it to its end: it ran until then
        return CloseOutcome(r, outcome, LOG_SOURCE, registered=added.seen, ran_to_end=to_end, generated=generated,
                            generated_how=how, slot_seconds=max(0.0, r.ended - start), slot_how=CLIENT_SOURCE)
    slot: float | None = None
    slot_how = ""
    end = lines.complete if lines is not None and lines.complete is not None else None
    if end is not None:
        slot, slot_how = max(0.0, end - start), LOG_SOURCE
    else:
        gap = _gap(r) or run_gap
        if generated is not None and gap is not None:
            slot, slot_how = max(0, generated - r.tokens_read) * gap, CLIENT_ESTIMATE
    return CloseOutcome(r, outcome, LOG_SOURCE, registered=added.seen, ran_to_end=to_end, generated=generated,
                        generated_how=how, slot_seconds=slot, slot_how=slot_how)


# --- figures -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CloseFigures:
    """The closed stops of one stack × close mode cell (or of the run), by what the server made of them."""

    closed_stops: Figure  # stopped streams whose client closed (close modes other than none)
    never_reached: Figure  # of which the server has no trace of
    ran_on: Figure  # registered, never aborted by the run's end: a missed close (a zombie)
    ran_on_to_end: Figure  # of which the server confirmed ran to its end
    ran_on_tokens: Figure  # tokens the ran-on streams generated beyond what their users read
    ran_on_slot_seconds: Figure  # slot time they held after Stop

    def items(self) -> list[tuple[str, Figure]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


def _sum_known(values: list[float | int | None], unit: str, source: str, what: str) -> Figure:
    known = [v for v in values if v is not None]
    if values and not known:
        return unknown(unit, f"no {what} for the {len(values)} ran-on stream(s)")
    total: float | int = math.fsum(known) if unit == "slot-s" else int(sum(known))
    missing = len(values) - len(known)
    return Figure(total, unit, source, f"{missing} ran-on stream(s) without a {what} left out" if missing else None)


def close_figures(outcomes: Sequence[CloseOutcome], source: str) -> CloseFigures:
    """The figures of `outcomes` (one cell's, or the run's); `source` is the truth they were classed by."""
    closed = [o for o in outcomes if o.closed]
    ran = [o for o in closed if o.outcome == RAN_ON]
    ends = [o.ran_to_end for o in ran]
    if ran and all(e is None for e in ends):
        to_end = unknown("streams", "the log says whether a stream ran to its end only with --enable-log-outputs")
    else:
        to_end = Figure(sum(1 for e in ends if e), "streams", source,
                        "(streaming complete) logged" if source == LOG_SOURCE else "finish length or stop")
    tokens = _sum_known([o.wasted for o in ran], "tokens", source, "token count")
    if ran and tokens.known and {o.generated_how for o in ran if o.generated is not None} != {
            "max_tokens with ignore_eos (Received request line)"} and source == LOG_SOURCE:
        tokens = Figure(tokens.value, tokens.unit, source, "; ".join(filter(None, (
            "from streaming delta lines where max_tokens with ignore_eos does not say: a lower bound",
            tokens.note))))
    slot_sources = {o.slot_how for o in ran if o.slot_seconds is not None}
    slot_source = next(iter(slot_sources)) if len(slot_sources) == 1 else (CLIENT_ESTIMATE if ran else source)
    slots = _sum_known([o.slot_seconds for o in ran], "slot-s", slot_source, "slot time")
    if slot_source == CLIENT_ESTIMATE and slots.known:
        slots = Figure(slots.value, "slot-s", CLIENT_ESTIMATE, "; ".join(filter(None, (
            "tokens left at Stop × the stream's (else the run's median) inter-token gap, where the log has no "
            "(streaming complete) line", slots.note))))
    return CloseFigures(
        closed_stops=Figure(len(closed), "streams", CLIENT_SOURCE, "stopped streams in close modes other than none"),
        never_reached=Figure(sum(1 for o in closed if o.outcome == NEVER_REACHED), "streams", source,
                             "no trace on the server: closed before it registered the request"),
        ran_on=Figure(len(ran), "streams", source, "registered, never aborted by the run's end: a missed close"),
        ran_on_to_end=to_end,
        ran_on_tokens=tokens,
        ran_on_slot_seconds=slots,
    )


def ran_on_finding(outcomes: Sequence[CloseOutcome], source: str) -> Figure:
    """The run's missed closes in words: how many stopped requests kept generating, and what share of the
    stopped requests the engine registered that was."""
    closed = [o for o in outcomes if o.closed]
    if not closed:
        return Figure("no stopped stream closed", "finding", source)
    ran = [o for o in closed if o.outcome == RAN_ON]
    registered = [o for o in closed if o.outcome != NEVER_REACHED]
    never = len(closed) - len(registered)
    tail = f"; {never} of {len(closed)} closed before the engine registered them" if never else ""
    if not registered:
        return Figure(f"none of {len(closed)} closed stops reached the engine", "finding", source)
    if not ran:
        return Figure(f"none of {len(registered)} stopped requests the engine registered kept generating: every one "
                      f"was aborted{tail}", "finding", source)
    share = 100.0 * len(ran) / len(registered)
    to_end = [o for o in ran if o.ran_to_end]
    confirmed = (f", {len(to_end)} confirmed run to the end" if any(o.ran_to_end is not None for o in ran)
                 else "")
    text = (f"{len(ran)} of {len(registered)} stopped requests the engine registered kept generating "
            f"({share:.1f} %): never aborted{confirmed}{tail}")
    return Figure(text, "finding", source, "ran on: registered, no abort by the run's end (a missed close)")


def log_zombies(outcomes: Sequence[CloseOutcome], grace: float) -> tuple[Figure, Figure]:
    """Zombies by vLLM's log, where there is no ledger: stopped streams still in the engine `grace` after Stop.

    Those are the ran-on ones (and `none` streams read on past `grace`), and those whose abort line was read
    later than `grace` after Stop (a hold, a drop the garbage collector closed late). Slot time: from Stop
    (or `Added`) to the abort line read, or the ran-on stream's own slot time.
    """
    slots: list[float | None] = []
    estimated = False
    for o in outcomes:
        stop = o.record.stop
        if stop is None or o.outcome == NEVER_REACHED:
            continue
        if o.outcome == ABORTED:
            lat = o.abort_latency
            if lat is not None and lat > grace and o.abort_at is not None:
                slots.append(max(0.0, o.abort_at - max(stop, o.registered or stop)))
        elif o.outcome == RAN_ON or (o.slot_seconds is not None and o.slot_seconds > grace):
            slots.append(o.slot_seconds)
            estimated |= o.slot_how == CLIENT_ESTIMATE
    known = [v for v in slots if v is not None]
    notes = [f"{len(slots) - len(known)} zombie(s) without a slot time left out"] if len(known) < len(slots) else []
    if estimated:
        notes.insert(0, "some estimated: tokens left at Stop × inter-token gap (no (streaming complete) line)")
    slot = (Figure(math.fsum(known), "slot-s", CLIENT_ESTIMATE if estimated else LOG_SOURCE,
                   "; ".join(notes) or None)
            if known or not slots else unknown("slot-s", "no slot time for the zombies the log shows"))
    note = f"not aborted within {grace:g} s of Stop (abort line read), or never (ran on)"
    return Figure(len(slots), "streams", LOG_SOURCE, note), slot
