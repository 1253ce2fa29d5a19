"""Abort accounting: what every Stop cost the server, per client stack × close mode and for the whole run.

Pure functions over the client's `StreamRecord`s and the server's truth: the simulator's ledger (exact, per
request) and a vLLM `/metrics` window delta (aggregate). No I/O, so a report can be rebuilt from saved files.
Each record is joined to its ledger entry by server id: `record.server_id`, else the id the server derives
from our X-Request-Id (`chatcmpl-…` for chat, `cmpl-…` for completions).

Every figure carries its unit and its source, so nobody mistakes a client's belief for server truth:

- `simulator ledger`: the simulator's per-request truth (exact);
- `vLLM metrics`: Δ of vLLM's Prometheus counters over the run (aggregate only: not per stack or mode);
- `client records`: what the clients themselves did and saw (streams, Stops, tokens read): truth about the
  client, which is the only place it exists;
- `vLLM log`: vLLM's own `Added request …` / `Aborted request …` lines, each stamped with `time.monotonic()`
  when the follower read it (metrics/truth/vllm_log.py): per-request abort confirmation without a ledger. Its abort
  latency is Stop → abort *logged* (line read), not slot freed: the engine frees the slot at about that time,
  but the log adds its own write and read delays (the follower polls every 20 ms by default);
- `client estimate`: a server-side quantity guessed from client marks, used only when no truth has it.

A figure whose truth is missing is None (source `unavailable`), never 0; a sum over an empty but known set is 0.
With a ledger, the ledger gives `aborted` and `abort_latency`; the log's own view is kept beside it
(`log_aborted`, `log_abort_latency`) so the two can be compared. Without a ledger, the log gives both.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from stopstorm.metrics.analysis.closes import (
    CloseOutcome,
    classify_ledger,
    classify_log,
    close_figures,
    log_zombies,
    ran_on_finding,
)
from stopstorm.metrics.figures import (
    CLIENT_ESTIMATE,
    CLIENT_SOURCE,
    LEDGER_SOURCE,
    LOG_SOURCE,
    METRICS_SOURCE,
    Figure,
    distribution,
    unknown,
)
from stopstorm.metrics.record import INTERRUPTED, StreamRecord
from stopstorm.metrics.truth.ledger import LedgerSnapshot
from stopstorm.metrics.truth.vllm_log import LogEvent, LogIndex, base_request_id
from stopstorm.metrics.truth.vllm_metrics import MetricsDelta
from stopstorm.simulator.ledger import LedgerEntry

__all__ = [
    "NOT_STOPPED",
    "RUN_QUEUE_WAIT_NOTE",
    "ZOMBIE_GRACE_S",
    "Accounting",
    "Cell",
    "Figures",
    "LogLookup",
    "RunFigures",
    "StopRow",
    "account",
    "by_outcome",
    "by_plan",
    "ledger_occupancy",
    "server_id",
    "stop_rows",
    "wasted_tokens",
]

ZOMBIE_GRACE_S = 0.1
RUN_QUEUE_WAIT_NOTE = "arrival → scheduled, every request the server served"
# The cell of a stream nobody stopped under `by_outcome`: its close mode was never used (a stream that ended
# before its planned Stop, one planned never to stop, one the run's end cut), so it is filed once, here.
NOT_STOPPED = "not stopped"


class LogLookup(Protocol):
    """What accounting needs of a vLLM log: `LogFollower` (live) or `LogIndex` (saved lines)."""

    @property
    def aborted(self) -> Mapping[str, LogEvent]: ...

    def lookup(self, request_id: str) -> tuple[LogEvent | None, LogEvent | None]: ...

# The closed-stop figures' defaults, until `_with_closes` fills them (a truth was read)
_NO_STREAMS, _NO_TOKENS, _NO_SLOT_S, _NO_FINDING = (unknown(u) for u in ("streams", "tokens", "slot-s", "finding"))


@dataclass(frozen=True, slots=True)
class Figures:
    """The figures of one stack × close mode cell, or of the whole run (stack and mode "all")."""

    streams: Figure  # streams the clients reported
    stopped: Figure  # of which the user pressed Stop
    failed: Figure  # of which failed (error text set), streams the run's end cut short aside
    failures: Figure  # failed streams by error text
    interrupted: Figure  # streams the run's own end cut short (recorded, not failures: the server did no wrong)
    aborted: Figure  # stopped streams the server aborted
    abort_latency: Figure  # Stop → slot freed, aborted stopped streams (Distribution, s)
    wasted_tokens: Figure  # generated but never read
    zombies: Figure  # stopped streams still holding a slot `zombie_grace_s` after Stop
    zombie_slot_seconds: Figure  # slot time zombies held after Stop
    queue_wait: Figure  # arrival → scheduled (Distribution, s)
    freed_tokens: Figure  # tokens aborts spared the engine vs running every stopped stream to its end
    freed_slot_seconds: Figure  # the same, in slot-seconds
    goodput_tokens: Figure  # tokens delivered to users still reading
    goodput_rate: Figure  # goodput_tokens / run duration
    log_aborted: Figure  # stopped streams whose abort the vLLM log shows
    log_abort_latency: Figure  # Stop → abort line read, those streams (Distribution, s)
    ttft: Figure  # request written (or sent) → first token, as the client saw it (Distribution, s)
    # What the server made of each closed stop (metrics/analysis/closes.py; `_with_closes` fills them)
    closed_stops: Figure = _NO_STREAMS  # stopped streams whose client closed (modes other than none)
    never_reached: Figure = _NO_STREAMS  # of which the server has no trace
    ran_on: Figure = _NO_STREAMS  # registered, never aborted by the run's end: missed closes (zombies)
    ran_on_to_end: Figure = _NO_STREAMS  # of which the server confirmed ran to their end
    ran_on_tokens: Figure = _NO_TOKENS  # generated for ran-on streams beyond what their users read
    ran_on_slot_seconds: Figure = _NO_SLOT_S  # slot time ran-on streams held after Stop

    def items(self) -> list[tuple[str, Figure]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


@dataclass(frozen=True, slots=True)
class Cell:
    stack: str
    close_mode: str
    figures: Figures


@dataclass(frozen=True, slots=True)
class RunFigures:
    """Whole-run figures that have no per-cell meaning."""

    duration: Figure
    freed_tokens_rate: Figure  # freed tokens per second of run
    ledger_aborts: Figure  # every abort in the ledger (client disconnects), joined to a record or not
    vllm_counted_aborts: Figure  # Δ request_success_total{finished_reason="abort"}
    blind_spot: Figure  # the finding, in words: "N aborts, vLLM counted M"
    log_aborts: Figure  # every abort the vLLM log showed during the run, joined to a record or not
    unmatched_requests: Figure  # ledger requests no record reported (e.g. users killed at the run's end)
    unjoined_streams: Figure  # records the ledger does not know (with a ledger present)
    ran_on: Figure = _NO_FINDING  # the missed closes in words (metrics/analysis/closes.py)

    def items(self) -> list[tuple[str, Figure]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


@dataclass(frozen=True, slots=True)
class Accounting:
    cells: tuple[Cell, ...]  # sorted by stack, then close mode
    overall: Figures
    run: RunFigures
    sources: tuple[str, ...]  # the truths that were available
    zombie_grace_s: float


# --- helpers ---------------------------------------------------------------------------------------------------


def by_outcome(record: StreamRecord) -> tuple[str, str]:
    """The report's cell of a stream: its stack and the close mode it used, or `NOT_STOPPED` when nobody pressed
    Stop (so `none`, a close mode, only holds streams a user stopped and read on)."""
    return record.stack, record.close_mode if record.stop is not None else NOT_STOPPED


def by_plan(record: StreamRecord) -> tuple[str, str]:
    """A stream's stack and planned close mode, stopped or not (`account`'s default grouping)."""
    return record.stack, record.close_mode


def server_id(record: StreamRecord) -> str:
    """The id the server knows this stream by."""
    if record.server_id:
        return record.server_id
    return ("chatcmpl-" if record.endpoint == "chat" else "cmpl-") + record.request_id


def ledger_occupancy(entries: Iterable[LedgerEntry]) -> list[tuple[float, int, int]]:
    """(t, running, waiting) just after each moment either changes, on the ledger's clock, from every entry's
    arrival, scheduled and freed marks: the one running count the capacity timeline and the replay's
    calibration share. A request not yet freed is still running (or waiting) at the end."""
    deltas: dict[float, list[int]] = {}

    def bump(t: float | None, running: int, waiting: int) -> None:
        if t is None:
            return
        d = deltas.setdefault(t, [0, 0])
        d[0] += running
        d[1] += waiting

    for e in entries:
        arrival, scheduled, freed = e.arrival, e.scheduled, e.freed
        bump(arrival, 0, 1)
        if scheduled is not None:
            bump(scheduled, 1, -1)
            bump(freed, -1, 0)
        else:
            bump(freed, 0, -1)
    out: list[tuple[float, int, int]] = []
    running = waiting = 0
    for t in sorted(deltas):
        running += deltas[t][0]
        waiting += deltas[t][1]
        out.append((t, running, waiting))
    return out


def wasted_tokens(entry: LedgerEntry, record: StreamRecord) -> int:
    """Tokens the server generated for this stream that its user never read (per-request truth)."""
    return max(0, entry.generated_tokens - record.tokens_read)


def _itl(entry: LedgerEntry) -> float | None:
    """Mean inter-token time of one request, from its first and last token; None under two tokens."""
    n, first, last = entry.generated_tokens, entry.first_token, entry.last_token
    if n < 2 or first is None or last is None:
        return None
    return float(last - first) / (n - 1)


@dataclass(slots=True)
class _Joined:
    record: StreamRecord
    entry: LedgerEntry | None


def _zombie_time(j: _Joined, grace: float, run_end: float | None) -> float | None:
    """Slot time a stopped stream's request held after Stop, if it is a zombie; None if it is not (or unknown).

    A zombie: a stopped stream whose server request still held a running slot `grace` seconds after Stop,
    i.e. it was scheduled, and was freed more than `grace` after Stop (or never, by the run's end). Its slot
    time runs from Stop (or its scheduling, if later) to freed (or the run's end).
    """
    r, e = j.record, j.entry
    if r.stop is None or e is None or e.scheduled is None:
        return None
    end = e.freed
    if end is None:
        end = run_end
    if end is None or end - r.stop <= grace:
        return None
    held = end - max(r.stop, e.scheduled)
    return held if held > 0 else None


def _abort_index(log: LogLookup) -> dict[str, LogEvent]:
    """Every abort event under its raw and its base id; where several share an id, the first read.

    vLLM 0.32 logs `Aborted request(s) <id>-<hex>.` then `Request <id> aborted.` for one abort; the follower
    indexes the second under `<id>`, so the earlier line is found here by its base id.
    """
    out: dict[str, LogEvent] = {}
    for ev in log.aborted.values():
        for rid in (ev.request_id_raw, ev.request_id_base):
            held = out.get(rid)
            if held is None or ev.seen < held.seen:
                out[rid] = ev
    return out


def _log_abort(record: StreamRecord, aborts: Mapping[str, LogEvent]) -> LogEvent | None:
    """The log's abort event for this stream: by its server id, raw or base (newest vLLM adds `-<8 hex>`)."""
    sid = server_id(record)
    found = [ev for rid in dict.fromkeys((sid, base_request_id(sid))) if (ev := aborts.get(rid)) is not None]
    return min(found, key=lambda ev: ev.seen) if found else None


def _log_figures(stopped: list[_Joined], aborts: Mapping[str, LogEvent] | None) -> tuple[Figure, Figure]:
    if aborts is None:
        return unknown("streams"), unknown("s")
    confirmed = [(j.record, ev) for j in stopped if (ev := _log_abort(j.record, aborts)) is not None]
    lat = distribution(ev.seen - r.stop for r, ev in confirmed if r.stop is not None)
    return (Figure(len(confirmed), "streams", LOG_SOURCE, "stopped streams with an abort line for their id"),
            Figure(lat, "s", LOG_SOURCE, "Stop → abort logged (line read), not slot freed")
            if lat is not None else unknown("s"))


def _figures(group: list[_Joined], has_ledger: bool, duration_s: float, grace: float,
             run_end: float | None, aborts: Mapping[str, LogEvent] | None = None) -> Figures:
    records = [j.record for j in group]
    stopped = [j for j in group if j.record.stopped]
    failures = Counter(r.error for r in records if r.error is not None and r.error != INTERRUPTED)
    interrupted = sum(1 for r in records if r.error == INTERRUPTED)
    joined = [j for j in group if j.entry is not None]
    goodput = sum(r.tokens_read for r in records)
    rate = Figure(goodput / duration_s, "tokens/s", CLIENT_SOURCE) if duration_s > 0 else unknown("tokens/s")
    ttft = distribution(t for r in records if (t := r.ttft) is not None)
    base = {
        "streams": Figure(len(records), "streams", CLIENT_SOURCE),
        "stopped": Figure(len(stopped), "streams", CLIENT_SOURCE),
        "failed": Figure(sum(failures.values()), "streams", CLIENT_SOURCE),
        "failures": Figure(dict(sorted(failures.items())), "streams", CLIENT_SOURCE, "by error text"),
        "interrupted": Figure(interrupted, "streams", CLIENT_SOURCE, "cut short by the run's end, not failures"),
        "goodput_tokens": Figure(goodput, "tokens", CLIENT_SOURCE, "tokens read before Stop or to the end"),
        "goodput_rate": rate,
        "ttft": (Figure(ttft, "s", CLIENT_SOURCE, "request written (where stamped, else sent) → first token, as "
                        "the client saw it") if ttft is not None else unknown("s")),
    }
    log_aborted, log_latency = _log_figures(stopped, aborts)
    base["log_aborted"], base["log_abort_latency"] = log_aborted, log_latency
    if not has_ledger:
        waits = [r.first_token - r.headers for r in records if r.first_token is not None and r.headers is not None]
        qw = distribution(waits)
        return Figures(
            **base,
            aborted=log_aborted, abort_latency=log_latency, wasted_tokens=unknown("tokens"),
            zombies=unknown("streams"), zombie_slot_seconds=unknown("slot-s"),
            queue_wait=(Figure(qw, "s", CLIENT_ESTIMATE, "headers → first token: queue wait + prefill")
                        if qw is not None else unknown("s")),
            freed_tokens=unknown("tokens"), freed_slot_seconds=unknown("slot-s"),
        )

    aborted = [(j.record, j.entry) for j in stopped if j.entry is not None and j.entry.finish_reason == "abort"]
    latencies = [e.freed - r.stop for r, e in aborted if e.freed is not None and r.stop is not None]
    wasted = sum(wasted_tokens(j.entry, j.record) for j in joined if j.entry is not None)
    zombie_times = [t for j in stopped if (t := _zombie_time(j, grace, run_end)) is not None]
    waits = [w for j in joined if j.entry is not None and (w := j.entry.queue_wait) is not None]
    freed_tokens = 0
    freed_slot_s = 0.0
    slot_s_known = 0
    slot_s_wanted = 0
    for _r, e in aborted:
        rest = max(0, e.target_tokens - e.generated_tokens)
        freed_tokens += rest
        if rest:
            slot_s_wanted += 1
            itl = _itl(e)
            if itl is not None:
                freed_slot_s += rest * itl
                slot_s_known += 1
    lat = distribution(latencies)
    qw = distribution(waits)
    slot_note = "remaining tokens × the request's mean inter-token time"
    if slot_s_known < slot_s_wanted:
        slot_note += f"; {slot_s_wanted - slot_s_known} request(s) with under two tokens left out"
    return Figures(
        **base,
        aborted=Figure(len(aborted), "streams", LEDGER_SOURCE),
        abort_latency=Figure(lat, "s", LEDGER_SOURCE, "Stop → slot freed") if lat is not None else unknown("s"),
        wasted_tokens=Figure(wasted, "tokens", LEDGER_SOURCE, "generated − read, per stream"),
        zombies=Figure(len(zombie_times), "streams", LEDGER_SOURCE, f"not freed within {grace:g} s of Stop"),
        zombie_slot_seconds=Figure(math.fsum(zombie_times), "slot-s", LEDGER_SOURCE),
        queue_wait=Figure(qw, "s", LEDGER_SOURCE, "arrival → scheduled") if qw is not None else unknown("s"),
        freed_tokens=Figure(freed_tokens, "tokens", LEDGER_SOURCE, "target − generated, aborted stopped streams"),
        freed_slot_seconds=(Figure(freed_slot_s, "slot-s", LEDGER_SOURCE, slot_note)
                            if slot_s_known or not slot_s_wanted else unknown("slot-s")),
    )


def _metrics_aborts(delta: MetricsDelta | None) -> float | None:
    if delta is None or delta.total.success is None:
        return None
    return delta.total.success.get("abort", 0.0)


# --- the accounting --------------------------------------------------------------------------------------------


def account(records: Sequence[StreamRecord], ledger: LedgerSnapshot | None,
            metrics_delta: MetricsDelta | None, duration_s: float, *, zombie_grace_s: float = ZOMBIE_GRACE_S,
            run_end: float | None = None, log: LogLookup | None = None,
            cell_of: Callable[[StreamRecord], tuple[str, str]] = by_plan) -> Accounting:
    """Account for every stream: per stack × close mode, overall, and run-wide findings.

    `ledger`: the simulator's ledger, None without a simulator. `metrics_delta`: vLLM `/metrics` over the run,
    None if not scraped. `duration_s`: the run's length, for rates. `run_end`: monotonic time a request still in
    flight is counted to; by default the ledger's `now`. `log`: vLLM's request log (`LogFollower` or
    `LogIndex`), None if not read. `cell_of`: a stream's (stack, close mode) cell; the report files streams
    `by_outcome` (unstopped ones once, as `NOT_STOPPED`).
    """
    has_ledger = ledger is not None
    entries = ledger.by_id if ledger is not None else {}
    if run_end is None and ledger is not None:
        run_end = ledger.now
    joined = [_Joined(r, entries.get(server_id(r))) for r in records]
    aborts = _abort_index(log) if log is not None else None
    groups: dict[tuple[str, str], list[_Joined]] = {}
    for j in joined:
        groups.setdefault(cell_of(j.record), []).append(j)
    cells = tuple(Cell(stack, mode, _figures(groups[(stack, mode)], has_ledger, duration_s, zombie_grace_s, run_end,
                                             aborts))
                  for stack, mode in sorted(groups))
    overall = _figures(joined, has_ledger, duration_s, zombie_grace_s, run_end, aborts)
    if ledger is not None:
        # The run's queue wait is every request the server served, whether a stream reported it or not (a user
        # killed at the run's end): the population the capacity section's CDF and the replay see too.
        qw = distribution(w for e in ledger.served if (w := e.queue_wait) is not None)
        overall = _replace(overall, queue_wait=Figure(qw, "s", LEDGER_SOURCE, RUN_QUEUE_WAIT_NOTE) if qw is not None
                           else unknown("s"))

    if not has_ledger and metrics_delta is not None and metrics_delta.total.generation_tokens is not None:
        wasted = metrics_delta.total.generation_tokens - sum(r.tokens for r in records)
        overall = _replace(overall, wasted_tokens=Figure(
            wasted, "tokens", METRICS_SOURCE,
            "aggregate: Δ generation_tokens_total − tokens the clients received"))

    ledger_aborts = sum(1 for e in entries.values() if e.finish_reason == "abort") if has_ledger else None
    counted = _metrics_aborts(metrics_delta)
    # By base id: vLLM 0.9 logs two lines per abort with one id, 0.32 two lines with the raw and the base id.
    log_aborts = len({e.request_id_base for e in log.aborted.values()}) if log is not None else None
    if ledger_aborts is not None and counted is not None:
        finding: Figure = Figure(f"{ledger_aborts} aborts, vLLM counted {counted:g}", "finding", LEDGER_SOURCE,
                                 "ledger aborts vs Δ request_success_total{finished_reason=\"abort\"}")
    elif log_aborts is not None and counted is not None:
        finding = Figure(f"{log_aborts} aborts logged, vLLM counted {counted:g}", "finding", LOG_SOURCE,
                         "aborts in vLLM's log vs Δ request_success_total{finished_reason=\"abort\"}")
    else:
        finding = unknown("finding")
    seen_ids = {server_id(r) for r in records}
    freed = overall.freed_tokens.value
    run = RunFigures(
        duration=Figure(duration_s, "s", CLIENT_SOURCE),
        freed_tokens_rate=(Figure(freed / duration_s, "tokens/s", LEDGER_SOURCE)
                           if isinstance(freed, int) and duration_s > 0 else unknown("tokens/s")),
        ledger_aborts=(Figure(ledger_aborts, "requests", LEDGER_SOURCE, "finish_reason abort")
                       if ledger_aborts is not None else unknown("requests")),
        vllm_counted_aborts=(Figure(counted, "requests", METRICS_SOURCE,
                                    "Δ request_success_total{finished_reason=\"abort\"}")
                             if counted is not None else unknown("requests")),
        blind_spot=finding,
        log_aborts=(Figure(log_aborts, "requests", LOG_SOURCE, "aborts logged during the run, distinct base ids")
                    if log_aborts is not None else unknown("requests")),
        unmatched_requests=(Figure(sum(1 for rid in entries if rid not in seen_ids), "requests", LEDGER_SOURCE,
                                   "in the ledger, reported by no stream")
                            if has_ledger else unknown("requests")),
        unjoined_streams=(Figure(sum(1 for j in joined if j.entry is None), "streams", LEDGER_SOURCE,
                                 "reported, but not in the ledger")
                          if has_ledger else unknown("streams")),
    )
    sources = [CLIENT_SOURCE]
    if has_ledger:
        sources.append(LEDGER_SOURCE)
    else:
        sources.append(CLIENT_ESTIMATE)
    if log is not None:
        sources.append(LOG_SOURCE)
    if metrics_delta is not None:
        sources.append(METRICS_SOURCE)
    cells, overall, run = _with_closes(cells, overall, run, records, ledger, log, run_end, zombie_grace_s)
    return Accounting(cells, overall, run, tuple(sources), zombie_grace_s)


def _with_closes(cells: tuple[Cell, ...], overall: Figures, run: RunFigures, records: Sequence[StreamRecord],
                 ledger: LedgerSnapshot | None, log: LogLookup | None, run_end: float | None,
                 grace: float) -> tuple[tuple[Cell, ...], Figures, RunFigures]:
    """Each closed stop classed never reached / aborted / ran on (metrics/analysis/closes.py), by the ledger
    or else vLLM's log, as figures in every cell, the overall row and the run's finding. Without a ledger the
    log's zombies (the ran-on streams and the aborts read later than `grace`) fill `zombies`, which the log
    alone otherwise leaves unknown; with one, the ledger's zombies stand."""
    outcomes: list[CloseOutcome]
    if ledger is not None:
        outcomes, source = classify_ledger(records, ledger.by_id, run_end), LEDGER_SOURCE
    elif isinstance(log, LogIndex):
        outcomes, source = classify_log(records, log), LOG_SOURCE
    else:
        return cells, overall, run
    by_cell: dict[tuple[str, str], list[CloseOutcome]] = {}
    for o in outcomes:
        by_cell.setdefault((o.record.stack, o.record.close_mode), []).append(o)

    def fill(figures: Figures, group: list[CloseOutcome]) -> Figures:
        changes = dict(close_figures(group, source).items())
        if ledger is None:
            changes["zombies"], changes["zombie_slot_seconds"] = log_zombies(group, grace)
        return _replace(figures, **changes)

    cells = tuple(Cell(c.stack, c.close_mode, fill(c.figures, by_cell.get((c.stack, c.close_mode), [])))
                  for c in cells)
    run = RunFigures(**{**dict(run.items()), "ran_on": ran_on_finding(outcomes, source)})
    return cells, fill(overall, outcomes), run


def _replace(figures: Figures, **changes: Figure) -> Figures:
    return Figures(**{**dict(figures.items()), **changes})


# --- each Stop, as the web UI's Stops tab lists them ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StopRow:
    """One stopped stream and what the server did about it (the newest are in the report's `stops`)."""

    stack: str
    close_mode: str
    request_id: str
    tokens_read: int
    generated: int | None  # None without per-request truth
    wasted: int | None
    stop_to_freed_s: float | None
    state: str  # the server's finish reason, "zombie (still running)", "aborting", or "unknown"
    truth: str
    zombie_slot_s: float | None = None  # slot time it held after Stop as a zombie (0: not one; None: unknown)


def stop_rows(records: Sequence[StreamRecord], ledger: LedgerSnapshot | None, *, limit: int = 50,
              zombie_grace_s: float = ZOMBIE_GRACE_S) -> tuple[StopRow, ...]:
    """The latest `limit` stopped streams, newest first, each with its server truth (the same rules as the
    accounting's: wasted tokens per stream, Stop → slot freed, a zombie still running `zombie_grace_s` after
    Stop)."""
    stopped: list[StreamRecord] = []
    for r in reversed(records):  # newest last in the run's list
        if r.stop is not None:
            stopped.append(r)
            if len(stopped) >= limit:
                break
    entries = ledger.by_id if ledger is not None else None
    rows = []
    for r in stopped:
        assert r.stop is not None
        e = entries.get(server_id(r)) if entries is not None else None
        if e is None:
            rows.append(StopRow(r.stack, r.close_mode, r.request_id, r.tokens_read, None, None, None, "unknown",
                                CLIENT_SOURCE))
            continue
        assert ledger is not None
        if e.freed is not None:
            freed: float | None = round(max(0.0, e.freed - r.stop), 6)
            state = e.finish_reason or "left"
        else:
            freed = None
            state = "zombie (still running)" if ledger.now - r.stop > zombie_grace_s else "aborting"
        held = _zombie_time(_Joined(r, e), zombie_grace_s, ledger.now)
        rows.append(StopRow(r.stack, r.close_mode, r.request_id, r.tokens_read, e.generated_tokens,
                            wasted_tokens(e, r), freed, state, LEDGER_SOURCE,
                            round(held, 6) if held is not None else 0.0))
    return tuple(rows)
