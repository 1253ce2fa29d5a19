"""Counterfactual replay: what one run would have looked like with every Stop aborted at once, or with none.

A run answers "what happened"; a capacity planner asks "what do early aborts buy us?". Running the same
traffic twice (A/B) answers it at twice the cost, and only where the load can be repeated. Instead, this takes
one run's recorded arrivals, prompt sizes, unstopped lengths and stop points (the simulator's ledger, and the
clients' `StreamRecord`s where they exist), and drives the simulator's own scheduler (`simulator.engine`,
socket- and clock-free) in virtual time as a discrete-event model: seconds of CPU for hours of traffic.

Three policies over the same arrivals:

- `recorded`: each request aborted where the server really aborted it (zombies included): the run as it was;
- `perfect`: every stopped stream aborted the moment its user pressed Stop (close within the step);
- `full`: every stopped stream left running to its end (the counterfactual "nobody stops").

The engine's step time is calibrated from the run itself (`calibrate`): the median inter-token gap of the
ledger's requests, and the prefill cost per prompt token from first-token delays, so the model is the server
that was measured, not the simulator's defaults. Arrivals are replayed as recorded (an open model): in a
closed-model run, where users wait for their answers, the counterfactual's arrivals would shift too, so the
replay is exact for open-model traffic and an estimate for closed.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stopstorm.metrics.analysis.accounting import ledger_occupancy, server_id
from stopstorm.metrics.figures import Distribution, distribution
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.ledger import LedgerSnapshot
from stopstorm.simulator.config import SimulatorConfig
from stopstorm.simulator.engine import Scheduler, StepPlan
from stopstorm.simulator.engine import Sequence as EngineSequence
from stopstorm.simulator.ledger import Ledger, LedgerEntry

__all__ = [
    "POLICIES",
    "TRACE_COLUMNS",
    "Counterfactuals",
    "ReplayRequest",
    "ReplayResult",
    "StepTiming",
    "calibrate",
    "replay",
    "replay_counterfactuals",
    "run_cut_time",
    "trace_from_ledger",
    "trace_from_rows",
    "trace_to_rows",
]

POLICIES = ("recorded", "perfect", "full")


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """One request of the recorded run, as the replay needs it."""

    request_id: str
    arrival: float  # seconds after the run's first arrival
    prompt_tokens: int
    target_tokens: int  # what it generates unstopped (EOS draw or max_tokens)
    stop_tokens: int | None = None  # tokens its user read before Stop; None: never stopped
    aborted_at_tokens: int | None = None  # tokens generated when the server really aborted it; None: not aborted


@dataclass(frozen=True, slots=True)
class StepTiming:
    """The engine step model, as `SimulatorConfig` has it: base + per running seq + per prefill token."""

    base_s: float
    per_seq_s: float = 0.0
    prefill_per_token_s: float = 0.0
    source: str = "given"  # how it was obtained, in words

    def config(self, max_num_seqs: int, max_num_batched_tokens: int = 2048) -> SimulatorConfig:
        return SimulatorConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                               max_model_len=10**9, step_base_s=self.base_s, step_per_seq_s=self.per_seq_s,
                               prefill_per_token_s=self.prefill_per_token_s)


@dataclass(slots=True)
class ReplayResult:
    """What one policy's replay says the server did; every time in seconds of virtual time."""

    policy: str
    requests: int
    makespan_s: float  # first arrival to the last request leaving the engine
    generated_tokens: int  # what the engine computed (vllm:generation_tokens_total)
    delivered_tokens: int  # tokens users read (up to Stop for stopped streams)
    wasted_tokens: int  # generated but not read
    slot_seconds: float  # running-slot time, scheduled → freed, summed
    queue_wait: Distribution | None
    ttft: Distribution | None  # arrival → first token, for requests that got one
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (t, running, waiting) at each change

    @property
    def throughput(self) -> float:
        """Generated tokens per second over the makespan (what the engine was busy with)."""
        return self.generated_tokens / self.makespan_s if self.makespan_s > 0 else 0.0

    @property
    def goodput(self) -> float:
        """Delivered tokens per second over the makespan."""
        return self.delivered_tokens / self.makespan_s if self.makespan_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "requests": self.requests, "makespan_s": self.makespan_s,
            "generated_tokens": self.generated_tokens, "delivered_tokens": self.delivered_tokens,
            "wasted_tokens": self.wasted_tokens, "slot_seconds": self.slot_seconds,
            "throughput_tok_s": self.throughput, "goodput_tok_s": self.goodput,
            "queue_wait": self.queue_wait.to_json() if self.queue_wait else None,
            "ttft": self.ttft.to_json() if self.ttft else None,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ReplayResult:
        """A result as `to_json` wrote it (in a saved report); the timeline is not kept there."""
        return cls(str(doc.get("policy", "")), int(doc.get("requests") or 0), float(doc.get("makespan_s") or 0),
                   int(doc.get("generated_tokens") or 0), int(doc.get("delivered_tokens") or 0),
                   int(doc.get("wasted_tokens") or 0), float(doc.get("slot_seconds") or 0),
                   Distribution.from_json(doc.get("queue_wait")), Distribution.from_json(doc.get("ttft")))


# --- the trace and the step model, from one run -----------------------------------------------------------------


def trace_from_ledger(ledger: LedgerSnapshot, records: Iterable[StreamRecord] = (),
                      cut_at: float | None = None) -> list[ReplayRequest]:
    """The run's requests in arrival order, from the simulator's ledger (`GET /stopstorm/ledger`).

    The user's stop point is the record's `tokens_at_stop` where a record is joined; without one, the tokens
    generated when the server saw the disconnect (equal for a client that closes at Stop, later for a zombie).
    Requests the server refused (status ≠ 200) are left out: they never took a slot. A disconnect at or after
    `cut_at` (the run's end, ledger clock) is the run stopping its users, not a user's Stop: not a stop point.
    """
    stops = {server_id(r): r.tokens_at_stop for r in records if r.stop is not None}
    entries = ledger.served
    if not entries:
        return []
    t0 = min(e.arrival for e in entries)
    out = []
    for e in sorted(entries, key=lambda e: e.arrival):
        rid = e.request_id
        stop: int | None
        if rid in stops:
            stop = stops[rid]
        elif (e.disconnect_seen is not None and e.generated_at_disconnect is not None
              and (cut_at is None or e.disconnect_seen < cut_at)):
            stop = e.generated_at_disconnect
        else:
            stop = None
        cut = cut_at is not None and e.freed is not None and e.freed >= cut_at
        aborted = e.generated_tokens if e.finish_reason == "abort" and not cut else None
        out.append(ReplayRequest(rid, e.arrival - t0, int(e.prompt_tokens), int(e.target_tokens),
                                 None if stop is None else int(stop), aborted))
    return out


def _running_integral(entries: Sequence[LedgerEntry]) -> tuple[list[float], list[float], list[int]]:
    """Event times, ∫ running dt up to each, and running just after each (`ledger_occupancy`'s count)."""
    times: list[float] = []
    area: list[float] = []
    level: list[int] = []
    acc, before, last = 0.0, 0, None
    for t, running, _waiting in ledger_occupancy(entries):
        if last is not None:
            acc += before * (t - last)
        times.append(t)
        area.append(acc)
        level.append(running)
        before, last = running, t
    return times, area, level


def _mean_running(times: list[float], area: list[float], level: list[int], a: float, b: float) -> float:
    def integral(t: float) -> float:
        k = bisect.bisect_right(times, t) - 1
        return 0.0 if k < 0 else area[k] + level[k] * (t - times[k])

    return (integral(b) - integral(a)) / (b - a)


def run_cut_time(ledger: LedgerSnapshot, records: Sequence[StreamRecord],
                 run_end: float | None) -> float | None:
    """When the run began stopping its users (ledger clock): they are killed just before the run's end is
    stamped, and a killed user reports no record, so the first disconnect of a request no record reports marks
    it (when records are given); else `run_end`. Every Stop a user pressed has its record."""
    if not records:
        return run_end
    reported = {server_id(r) for r in records}
    unreported = [e.disconnect_seen for e in ledger.entries
                  if e.disconnect_seen is not None and e.request_id not in reported]
    first = min(unreported, default=None)
    if first is None:
        return run_end
    return first if run_end is None else min(first, run_end)


def calibrate(ledger: LedgerSnapshot) -> StepTiming:
    """The step time the run's server really had, from its ledger: base + per running sequence + per prefill token.

    Each request's own inter-token time, (last_token − first_token) / (tokens − 1), is one sample of the step
    time at the mean number of running requests over its decode (from the ledger's scheduled/freed marks);
    a least-squares line through them, weighted by tokens, gives the base and per-sequence costs (the
    token-weighted mean alone where the running count hardly varied). Prefill: the step that finishes a prompt
    costs more; (first_token − scheduled) − step, over prompt tokens, median. Raises ValueError when the
    ledger has no request with three tokens.
    """
    entries = ledger.entries
    decoding = [(e, e.first_token, e.last_token) for e in entries
                if e.first_token is not None and e.last_token is not None and e.generated_tokens >= 3
                and e.last_token > e.first_token]
    if not decoding:
        raise ValueError("cannot calibrate the replay: no request in the ledger generated three tokens")
    times, area, level = _running_integral(entries)
    xs, ys, ws = [], [], []
    for e, first, last in decoding:
        gaps = e.generated_tokens - 1
        xs.append(_mean_running(times, area, level, first, last))
        ys.append((last - first) / gaps)
        ws.append(float(gaps))
    sw = math.fsum(ws)
    mx = math.fsum(w * x for w, x in zip(ws, xs, strict=True)) / sw
    my = math.fsum(w * y for w, y in zip(ws, ys, strict=True)) / sw
    sxx = math.fsum(w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True))
    sxy = math.fsum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys, strict=True))
    per_seq = max(0.0, sxy / sxx) if sxx / sw > 0.05 else 0.0
    base = my - per_seq * mx
    if base <= 0:  # a fit that would make an idle step free is noise: fall back to the mean
        base, per_seq = my, 0.0
    step = base + per_seq * mx
    prefill = [((e.first_token - e.scheduled) - step) / e.prompt_tokens for e in entries
               if e.first_token is not None and e.scheduled is not None and e.prompt_tokens]
    per_token = max(0.0, statistics.median(prefill)) if prefill else 0.0
    return StepTiming(base, per_seq, per_token,
                      source=f"measured: inter-token gaps of {len(decoding)} requests against their mean running "
                      f"count, prefill from {len(prefill)} first-token delays")


# --- the discrete-event model -----------------------------------------------------------------------------------


class _Timeline:
    """Engine observer that keeps running/waiting counts at each change (the scheduler's only output we read)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.points: list[tuple[float, int, int]] = []

    def on_queue_change(self, running: int, waiting: int) -> None:
        pts = self.points
        if pts and pts[-1][1] == running and pts[-1][2] == waiting:
            return
        if pts and pts[-1][0] == self.now:
            pts[-1] = (self.now, running, waiting)
        else:
            pts.append((self.now, running, waiting))

    def on_added(self, seq: EngineSequence, now: float) -> None: ...
    def on_abort_requested(self, seq: EngineSequence, now: float) -> None: ...
    def on_first_token(self, seq: EngineSequence, now: float) -> None: ...
    def on_step(self, plan: StepPlan, now: float, tokens: int, itl_samples: list[float]) -> None: ...
    def on_finished(self, seq: EngineSequence, now: float) -> None: ...
    def on_aborted(self, seq: EngineSequence, now: float) -> None: ...


def _abort_point(req: ReplayRequest, policy: str) -> int | None:
    if policy == "full":
        return None
    if policy == "perfect":
        return req.stop_tokens
    return req.aborted_at_tokens


def replay(trace: Sequence[ReplayRequest], timing: StepTiming, max_num_seqs: int, policy: str = "perfect",
           max_num_batched_tokens: int = 2048, keep_timeline: bool = True,
           horizon: float | None = None) -> ReplayResult:
    """Drive the simulator's scheduler in virtual time over `trace` under one abort `policy`.

    `horizon` (seconds after the first arrival) is where the real run ended and stopped its users: whatever is
    still running or waiting then is aborted, as the run's end did, so each policy is judged over the same
    window rather than credited with a drained queue the real run never saw.

    A stopping client's close reaches the server within a millisecond of the token it stopped on, i.e. while
    the next step runs, so its abort is asked for right after that step is planned: the slot is freed at the
    boundary after it and the step's token is dropped, exactly as the live engine does.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown replay policy {policy!r}; choose one of {', '.join(POLICIES)}")
    cfg = timing.config(max_num_seqs, max_num_batched_tokens)
    timeline = _Timeline()
    sched = Scheduler(cfg, Ledger(), timeline)
    order = sorted(trace, key=lambda r: r.arrival)
    abort_at: dict[str, int] = {}
    stop_read: dict[str, int | None] = {}
    seqs: list[EngineSequence] = []
    i, n = 0, len(order)
    now = order[0].arrival if order else 0.0
    to_abort: list[str] = []

    def admit_until(t: float) -> None:
        nonlocal i
        while i < n and order[i].arrival <= t:
            r = order[i]
            entry = LedgerEntry(r.request_id, "chat", True, r.prompt_tokens, r.target_tokens, r.target_tokens,
                                arrival=r.arrival)
            seq = EngineSequence(entry)
            seqs.append(seq)
            timeline.now = r.arrival
            sched.add(seq, r.arrival)
            point = _abort_point(r, policy)
            stop_read[r.request_id] = r.stop_tokens
            if point is not None and point < r.target_tokens:
                abort_at[r.request_id] = point
                if point <= 0:
                    to_abort.append(r.request_id)
            i += 1

    while i < n or not sched.idle:
        admit_until(now)
        timeline.now = now
        if horizon is not None and now >= horizon:  # the run's end: its users disconnect, the engine drains
            for seq in seqs:
                if seq.entry.freed is None:
                    sched.request_abort(seq.entry.request_id, now)
            i = n
        plan = sched.plan_step(now)
        if plan is None:
            to_abort.clear()
            if i < n:
                now = max(now, order[i].arrival)
            continue
        for rid in to_abort:
            sched.request_abort(rid, now)
        to_abort.clear()
        end = now + plan.duration
        admit_until(end)
        timeline.now = end
        sched.finish_step(plan, end)
        for seq, _ in plan.work:
            e = seq.entry
            point = abort_at.get(e.request_id)
            if point is not None and e.freed is None and e.generated_tokens >= point:
                del abort_at[e.request_id]
                to_abort.append(e.request_id)
        now = end
    return _result(policy, order, seqs, stop_read, timeline.points if keep_timeline else [])


def _result(policy: str, order: Sequence[ReplayRequest], seqs: list[EngineSequence],
            stop_read: Mapping[str, int | None], timeline: list[tuple[float, int, int]]) -> ReplayResult:
    entries = [s.entry for s in seqs]
    generated = sum(e.generated_tokens for e in entries)
    delivered = 0
    for e in entries:
        read = stop_read.get(e.request_id)
        delivered += e.generated_tokens if read is None else min(read, e.generated_tokens)
    slot = math.fsum(e.freed - e.scheduled for e in entries if e.scheduled is not None and e.freed is not None)
    t0 = order[0].arrival if order else 0.0
    end = max((e.freed for e in entries if e.freed is not None), default=t0)
    return ReplayResult(
        policy=policy, requests=len(entries), makespan_s=end - t0, generated_tokens=generated,
        delivered_tokens=delivered, wasted_tokens=generated - delivered, slot_seconds=slot,
        queue_wait=distribution(q for e in entries if (q := e.queue_wait) is not None),
        ttft=distribution(e.first_token - e.arrival for e in entries if e.first_token is not None),
        timeline=timeline)


@dataclass(slots=True)
class Counterfactuals:
    """One run replayed: the step model used, the trace and horizon replayed, and each policy's result."""

    timing: StepTiming
    trace: list[ReplayRequest]
    horizon: float | None
    results: dict[str, ReplayResult]


TRACE_COLUMNS = ("t_s", "prompt_tokens", "target_tokens", "stop_tokens", "aborted_at_tokens")


def trace_to_rows(trace: Sequence[ReplayRequest]) -> list[list[float | int | None]]:
    return [[round(r.arrival, 6), r.prompt_tokens, r.target_tokens, r.stop_tokens, r.aborted_at_tokens] for r in trace]


def trace_from_rows(rows: Sequence[Sequence[Any]]) -> list[ReplayRequest]:
    return [ReplayRequest(str(k), float(t), int(p), int(n), s, a) for k, (t, p, n, s, a) in enumerate(rows)]


def replay_counterfactuals(ledger: LedgerSnapshot, max_num_seqs: int, records: Iterable[StreamRecord] = (),
                           timing: StepTiming | None = None, policies: Sequence[str] = POLICIES,
                           run_end: float | None = None) -> Counterfactuals:
    """One run's ledger (and records) replayed under each policy, with the step time calibrated from it.

    `run_end` (ledger clock) is when the run stopped its users; the replay ends there too (see `replay`).
    """
    records = list(records)
    cut_at = run_cut_time(ledger, records, run_end)
    trace = trace_from_ledger(ledger, records, cut_at=cut_at)
    if not trace:
        raise ValueError("cannot replay: the ledger holds no served request")
    timing = timing or calibrate(ledger)
    t0 = min(e.arrival for e in ledger.served)
    horizon = None if cut_at is None else cut_at - t0
    return Counterfactuals(timing, trace, horizon,
                           {p: replay(trace, timing, max_num_seqs, p, horizon=horizon, keep_timeline=False)
                            for p in policies})
