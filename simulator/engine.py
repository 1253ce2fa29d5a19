"""vLLM's continuous-batching scheduler as a model that knows nothing of sockets or clocks.

The scheduler is driven by two calls, `plan_step(now)` and `finish_step(plan, now)`, with the time passed in.
The HTTP server drives it in real time (`EngineLoop`); a replay can drive it in virtual time, which is why no
method here reads a clock. Behaviour copied from vLLM V1 (see DESIGN.md §5):

- at most `max_num_seqs` requests run; waiting ones are admitted FCFS while a slot and step budget are free;
- each step, running requests are scheduled first (one decode token each, or their next prefill chunk), then
  waiting ones take what is left of `max_num_batched_tokens` (chunked prefill);
- the step that completes a prompt's prefill samples its first token; each later step one more token;
- an abort asked for during a step takes effect at the step boundary: the slot is freed then, and the token
  computed in that step is dropped uncounted (vLLM's output processor discards outputs of aborted requests);
- a request holds its slot until EOS, `max_tokens` or abort. A client that stops reading without closing
  its socket never asks for an abort, so its request runs to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from stopstorm.simulator.config import SimulatorConfig
from stopstorm.simulator.gpu_work import GpuWork
from stopstorm.simulator.ledger import Ledger, LedgerEntry

_log = logging.getLogger("simulator.engine")

__all__ = ["EngineLoop", "EngineObserver", "Scheduler", "Sequence", "StepPlan", "TokenSink"]


class TokenSink(Protocol):
    """Where a running request's output goes (the HTTP writer); the engine never waits on it."""

    def on_tokens(self, generated: int) -> None: ...

    def on_finish(self, reason: str) -> None: ...


class EngineObserver(Protocol):
    """Metrics and the request log watch the engine through this; every call gets the time it happened."""

    def on_added(self, seq: Sequence, now: float) -> None: ...

    def on_abort_requested(self, seq: Sequence, now: float) -> None: ...

    def on_first_token(self, seq: Sequence, now: float) -> None: ...

    def on_step(self, plan: StepPlan, now: float, tokens: int, itl_samples: list[float]) -> None: ...

    def on_finished(self, seq: Sequence, now: float) -> None: ...

    def on_aborted(self, seq: Sequence, now: float) -> None: ...

    def on_queue_change(self, running: int, waiting: int) -> None: ...


@dataclass(slots=True, eq=False)
class Sequence:
    """A request inside the engine: its ledger entry plus the scheduler's working state."""

    entry: LedgerEntry
    sink: TokenSink | None = None
    prompt_left: int = 0
    abort_requested: bool = False

    def __post_init__(self) -> None:
        self.prompt_left = self.entry.prompt_tokens


@dataclass(slots=True)
class StepPlan:
    """What one engine step computes: (sequence, tokens) pairs, and how long the step model says it takes."""

    started: float
    duration: float
    work: list[tuple[Sequence, int]] = field(default_factory=list)
    decode_tokens: int = 0
    prefill_tokens: int = 0


class Scheduler:
    """Running list, FCFS waiting queue, chunked prefill and aborts at step boundaries."""

    def __init__(self, config: SimulatorConfig, ledger: Ledger, observer: EngineObserver) -> None:
        self.config = config
        self.ledger = ledger
        self.observer = observer
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self._by_id: dict[str, Sequence] = {}
        self._pending_aborts: list[Sequence] = []
        self._rng = random.Random(config.seed)

    # -- requests in and out -------------------------------------------------------------------------

    def target_tokens(self, max_tokens: int, ignore_eos: bool, min_tokens: int) -> int:
        """How many tokens a request generates unstopped: max_tokens, or an EOS draw at least min_tokens."""
        if ignore_eos:
            return max_tokens
        return min(max_tokens, max(min_tokens, self.config.output_len.draw(self._rng)))

    def add(self, seq: Sequence, now: float) -> None:
        self.ledger.add(seq.entry)
        self._by_id[seq.entry.request_id] = seq
        self.waiting.append(seq)
        self.observer.on_added(seq, now)
        self.observer.on_queue_change(len(self.running), len(self.waiting))

    def request_abort(self, request_id: str, now: float) -> bool:
        """Ask for an abort; it takes effect at the next step boundary. False if the request already left."""
        seq = self._by_id.get(request_id)
        if seq is None or seq.abort_requested:
            return False
        seq.abort_requested = True
        self._pending_aborts.append(seq)
        self.observer.on_abort_requested(seq, now)
        return True

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    @property
    def has_pending_aborts(self) -> bool:
        return bool(self._pending_aborts)

    # -- one step ------------------------------------------------------------------------------------

    def process_aborts(self, now: float) -> None:
        """The step boundary: drop every request whose abort was asked for, freeing its slot or queue place."""
        if not self._pending_aborts:
            return
        aborted, self._pending_aborts = self._pending_aborts, []
        gone = set(aborted)
        self.running = [s for s in self.running if s not in gone]
        if any(s.entry.scheduled is None for s in aborted):
            self.waiting = deque(s for s in self.waiting if s not in gone)
        for seq in aborted:
            self._leave(seq, now, "abort")
            self.observer.on_aborted(seq, now)
        self.observer.on_queue_change(len(self.running), len(self.waiting))

    def plan_step(self, now: float) -> StepPlan | None:
        """Choose this step's work (running first, then FCFS admissions); None when there is nothing to do."""
        self.process_aborts(now)
        if self.idle:
            return None
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        plan = StepPlan(started=now, duration=0.0)
        work = plan.work
        for seq in self.running:
            if budget <= 0:
                break
            n = min(seq.prompt_left, budget) if seq.prompt_left else 1
            work.append((seq, n))
            budget -= n
        admitted = False
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting.popleft()
            seq.entry.scheduled = now
            self.running.append(seq)
            n = min(seq.prompt_left, budget)
            work.append((seq, n))
            budget -= n
            admitted = True
        decode = sum(1 for seq, _ in work if not seq.prompt_left)
        plan.decode_tokens = decode
        plan.prefill_tokens = cfg.max_num_batched_tokens - budget - decode
        plan.duration = cfg.step_duration(len(work), plan.prefill_tokens)
        if admitted:
            self.observer.on_queue_change(len(self.running), len(self.waiting))
        return plan

    def finish_step(self, plan: StepPlan, now: float) -> None:
        """The step's results land at `now`: tokens emitted, finished requests leave, aborts take effect.

        Aborts asked for during the step are processed last, after the step's stats are published, as vLLM
        does (its engine core handles aborts from its input queue between steps): their in-flight token is
        dropped uncounted, and vLLM 0.9's gauges, published only from steps, still show them.
        """
        finished: list[Sequence] = []
        itl: list[float] = []
        tokens = 0
        for seq, n in plan.work:
            if seq.abort_requested:
                continue  # aborted during the step: its token is dropped uncounted (it leaves below)
            entry = seq.entry
            if seq.prompt_left:
                seq.prompt_left -= n
                if seq.prompt_left:
                    continue  # prefill chunk done, prompt not finished yet
                entry.first_token = now
                self.observer.on_first_token(seq, now)
            else:
                itl.append(now - entry.last_token)  # type: ignore[operator]
            entry.last_token = now
            entry.generated_tokens += 1
            tokens += 1
            if seq.sink is not None:
                seq.sink.on_tokens(entry.generated_tokens)
            if entry.generated_tokens >= entry.target_tokens:
                finished.append(seq)
        if finished:
            gone = set(finished)
            self.running = [s for s in self.running if s not in gone]
            for seq in finished:
                reason = "length" if seq.entry.target_tokens >= seq.entry.max_tokens else "stop"
                self._leave(seq, now, reason)
                self.observer.on_finished(seq, now)
        self.observer.on_step(plan, now, tokens, itl)
        self.observer.on_queue_change(len(self.running), len(self.waiting))
        self.process_aborts(now)

    def _leave(self, seq: Sequence, now: float, reason: str) -> None:
        seq.entry.freed = now
        seq.entry.finish_reason = reason
        self.ledger.freed(seq.entry)
        self._by_id.pop(seq.entry.request_id, None)
        if seq.sink is not None:
            seq.sink.on_finish(reason)


class EngineLoop:
    """Runs the scheduler in real time on the server's event loop, one modelled step after another.

    A step's end is an absolute deadline (start + modelled duration). When the process is too busy to wake
    on time, the step ends late: that lateness is the step lag, counted and reported, never hidden.
    """

    def __init__(self, scheduler: Scheduler, gpu_work: GpuWork | None = None) -> None:
        self.scheduler = scheduler
        self.gpu_work = gpu_work  # GPU mode: real CUDA work per step, sized to the batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self.modelled_s = 0.0
        self.lag_s = 0.0
        self.steps_behind = 0
        self.max_lag_s = 0.0
        self._last_lag_log = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq, time.monotonic())
        self._wake.set()

    def client_gone(self, entry: LedgerEntry) -> bool:
        """The server saw the client's connection close: note it, and abort if the request is still in flight.

        The abort takes effect at the next step boundary. Returns False when the request had already finished.
        """
        now = time.monotonic()
        if entry.disconnect_seen is None:
            entry.disconnect_seen = now
            entry.generated_at_disconnect = entry.generated_tokens
        if not self.scheduler.request_abort(entry.request_id, now):
            return False
        self._wake.set()  # an engine with nothing running processes it at once
        return True

    async def _run(self) -> None:
        """Step after step, back to back: each starts at the boundary where the last one ended.

        Two things keep the schedule honest under load (measured at 1,024 streams, 20.24 ms steps):
        - The next step is planned at the boundary time, not after `finish_step`'s bookkeeping: the model's
          duration is boundary to boundary (vLLM's scheduler overhead is inside its step time too), so the
          simulator's own per-step work fits in the step or shows up as lag. Planned after it, ~1.8 ms a step
          went missing from both the model and the lag figure (46.6k of 50.6k tokens/s at "1 % lag").
        - The step's timer is armed only after the writers woken by the previous step have run. libuv (uvloop)
          computes its poll timeout from a clock it caches once per loop iteration, so a timer armed before
          ~11 ms of writer callbacks fired ~11 ms late: 33 % step lag (36k tokens/s) with the CPU 36 % busy.
          Armed after them, it fires on time whenever the work fits in the step.
        """
        sched = self.scheduler
        tolerance = sched.config.lag_tolerance_s
        now = time.monotonic()
        while True:
            plan = sched.plan_step(now)
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                now = time.monotonic()
                continue
            deadline = plan.started + plan.duration
            if self.gpu_work is not None:
                self.gpu_work.launch(plan.duration, len(plan.work), sched.config.max_num_seqs)
            await asyncio.sleep(0)  # the writers woken by the last step run first (see above)
            delay = deadline - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # uvloop's timers have millisecond resolution and can fire up to ~1 ms early: a step must never
            # end before its model says, so yield (writers keep running) until the deadline has passed.
            while time.monotonic() < deadline:
                await asyncio.sleep(0)
            now = time.monotonic()
            lag = max(0.0, now - deadline)
            self.steps += 1
            self.modelled_s += plan.duration
            self.lag_s += lag
            self.max_lag_s = max(self.max_lag_s, lag)
            if lag > tolerance:
                self.steps_behind += 1
            sched.finish_step(plan, now)
            if lag > tolerance and now - self._last_lag_log >= 1.0:
                self._last_lag_log = now
                _log.warning(
                    "Engine step ran %.1f ms behind schedule (%d of %d steps behind so far): "
                    "the simulator's CPU is saturated and its timings are late.",
                    lag * 1e3, self.steps_behind, self.steps,
                )

    def stats(self) -> dict[str, float | int]:
        return {
            "steps": self.steps,
            "modelled_s": self.modelled_s,
            "lag_s": self.lag_s,
            "lag_fraction": self.lag_s / self.modelled_s if self.modelled_s else 0.0,
            "max_lag_s": self.max_lag_s,
            "steps_behind": self.steps_behind,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
        }
