"""simulator.engine: vLLM's scheduler driven in virtual time, with no sockets and no clock.

Every test advances time itself (`plan = s.plan_step(t); t += plan.duration; s.finish_step(plan, t)`), so all
times asserted here are exact, not "about".
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stopstorm.distributions import LengthDistribution
from stopstorm.simulator.config import SimulatorConfig
from stopstorm.simulator.engine import Scheduler, Sequence, StepPlan
from stopstorm.simulator.ledger import Ledger, LedgerEntry


class Recorder:
    """An EngineObserver that writes down every call, with the time it was given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []
        self.steps: list[tuple[StepPlan, float, int, list[float]]] = []
        self.queue: list[tuple[int, int]] = []

    def on_added(self, seq: Sequence, now: float) -> None:
        self.events.append(("added", seq.entry.request_id, now))

    def on_abort_requested(self, seq: Sequence, now: float) -> None:
        self.events.append(("abort_requested", seq.entry.request_id, now))

    def on_first_token(self, seq: Sequence, now: float) -> None:
        self.events.append(("first_token", seq.entry.request_id, now))

    def on_step(self, plan: StepPlan, now: float, tokens: int, itl_samples: list[float]) -> None:
        self.steps.append((plan, now, tokens, list(itl_samples)))

    def on_finished(self, seq: Sequence, now: float) -> None:
        self.events.append(("finished", seq.entry.request_id, now))

    def on_aborted(self, seq: Sequence, now: float) -> None:
        self.events.append(("aborted", seq.entry.request_id, now))

    def on_queue_change(self, running: int, waiting: int) -> None:
        self.queue.append((running, waiting))

    def times(self, kind: str, rid: str) -> list[float]:
        return [t for k, r, t in self.events if k == kind and r == rid]


def config(**kw: Any) -> SimulatorConfig:
    base: dict[str, Any] = {"step_base_s": 0.010, "step_per_seq_s": 0.001, "prefill_per_token_s": 0.0001,
                            "max_num_seqs": 2, "max_num_batched_tokens": 2048}
    base.update(kw)
    return SimulatorConfig(**base)


def make(cfg: SimulatorConfig) -> tuple[Scheduler, Ledger, Recorder]:
    ledger, rec = Ledger(), Recorder()
    return Scheduler(cfg, ledger, rec), ledger, rec


def seq(rid: str, prompt: int = 10, target: int = 5, max_tokens: int | None = None, arrival: float = 0.0) -> Sequence:
    entry = LedgerEntry(request_id=rid, endpoint="chat", stream=True, prompt_tokens=prompt,
                        max_tokens=max_tokens if max_tokens is not None else target, target_tokens=target,
                        arrival=arrival)
    return Sequence(entry)


def step(s: Scheduler, t: float) -> tuple[StepPlan | None, float]:
    """One engine step from `t`; returns the plan and the time it ended."""
    plan = s.plan_step(t)
    if plan is None:
        return None, t
    t += plan.duration
    s.finish_step(plan, t)
    return plan, t


def run(s: Scheduler, t: float, until: Callable[[], bool] | None = None, max_steps: int = 10_000,
        plans: list[StepPlan] | None = None) -> float:
    """Step until `until()` holds or the engine is idle; returns the time."""
    for _ in range(max_steps):
        if until is not None and until():
            return t
        plan, t = step(s, t)
        if plan is None:
            return t
        if plans is not None:
            plans.append(plan)
    raise AssertionError("engine did not settle")


# --- slots and admission --------------------------------------------------------------------------------------


def test_running_list_is_capped_at_max_num_seqs():
    s, _, _ = make(config(max_num_seqs=2))
    seqs = [seq(f"r{i}", target=4) for i in range(5)]
    for q in seqs:
        s.add(q, 0.0)
    plans: list[StepPlan] = []
    t = 0.0
    saw_full_with_queue = False
    for _ in range(100):
        plan, t = step(s, t)
        if plan is None:
            break
        plans.append(plan)
        assert len(plan.work) <= 2
        assert len(s.running) <= 2
        saw_full_with_queue |= len(s.running) == 2 and len(s.waiting) > 0
    assert saw_full_with_queue
    assert s.idle
    assert all(q.entry.finish_reason == "length" and q.entry.generated_tokens == 4 for q in seqs)
    # With two slots, five 4-token requests take ceil(5/2) rounds of 4 steps: the cap really serialises them.
    assert len(plans) == 12


def test_admission_is_fcfs():
    s, _, _ = make(config(max_num_seqs=2))
    targets = [3, 6, 2, 4, 1, 5]
    seqs = [seq(f"r{i}", target=n, arrival=i * 1e-3) for i, n in enumerate(targets)]
    for q in seqs:
        s.add(q, q.entry.arrival)
    admitted: list[str] = []
    t = 0.01
    while True:
        before = {q.entry.request_id for q in s.running}
        plan, t = step(s, t)
        if plan is None:
            break
        admitted += [q.entry.request_id for q, _ in plan.work if q.entry.request_id not in before
                     and q.entry.scheduled == plan.started]
    assert admitted == [q.entry.request_id for q in seqs]
    scheduled = [q.entry.scheduled for q in seqs]
    assert scheduled == sorted(scheduled)
    # A request is admitted at the very step boundary where an earlier one freed its slot.
    frees = {q.entry.freed for q in seqs}
    for q in seqs[2:]:
        assert q.entry.scheduled in frees


def test_no_admission_without_a_free_slot_even_with_budget():
    s, _, _ = make(config(max_num_seqs=1, max_num_batched_tokens=4096))
    a, b = seq("a", target=3), seq("b", target=3)
    s.add(a, 0.0)
    s.add(b, 0.0)
    plan, t = step(s, 0.0)
    assert plan is not None and [q for q, _ in plan.work] == [a]
    assert list(s.waiting) == [b] and b.entry.scheduled is None
    t = run(s, t, until=lambda: a.entry.freed is not None)
    assert b.entry.scheduled is None  # freed at the boundary; admitted by the next plan
    plan, _ = step(s, t)
    assert plan is not None and b.entry.scheduled == t == a.entry.freed


# --- chunked prefill and step budget --------------------------------------------------------------------------


def test_chunked_prefill_spreads_a_long_prompt_over_steps():
    cfg = config(max_num_batched_tokens=100, max_num_seqs=4)
    s, _, rec = make(cfg)
    q = seq("long", prompt=250, target=3)
    s.add(q, 0.0)
    plans: list[StepPlan] = []
    t = 0.0
    ends = []
    for _ in range(3):
        plan, t = step(s, t)
        assert plan is not None
        plans.append(plan)
        ends.append(t)
    assert [p.prefill_tokens for p in plans] == [100, 100, 50]
    assert [p.decode_tokens for p in plans] == [0, 0, 0]
    assert [p.duration for p in plans] == [cfg.step_duration(1, n) for n in (100, 100, 50)]
    # First token is sampled by the step that completes the prefill, not before.
    assert q.entry.first_token == ends[2] == pytest.approx(sum(cfg.step_duration(1, n) for n in (100, 100, 50)))
    assert rec.times("first_token", "long") == [ends[2]]
    assert q.entry.generated_tokens == 1
    assert [st_[2] for st_ in rec.steps] == [0, 0, 1]
    plan, t = step(s, t)
    assert plan is not None and plan.prefill_tokens == 0 and plan.decode_tokens == 1
    assert plan.duration == cfg.step_duration(1, 0)


def test_decodes_are_scheduled_before_admissions_and_prefill_takes_the_rest():
    cfg = config(max_num_batched_tokens=64, max_num_seqs=4)
    s, _, _ = make(cfg)
    a = seq("a", prompt=10, target=50)
    s.add(a, 0.0)
    _, t = step(s, 0.0)
    assert a.entry.generated_tokens == 1
    b = seq("b", prompt=200, target=5)
    c = seq("c", prompt=5, target=5)
    s.add(b, t)
    s.add(c, t)
    plan = s.plan_step(t)
    assert plan is not None
    # a's decode comes first, b's prefill gets the remaining 63 tokens, and c gets no budget at all.
    assert [(q.entry.request_id, n) for q, n in plan.work] == [("a", 1), ("b", 63)]
    assert plan.decode_tokens == 1 and plan.prefill_tokens == 63
    assert plan.duration == cfg.step_duration(2, 63)
    assert list(s.waiting) == [c] and c.entry.scheduled is None
    t += plan.duration
    s.finish_step(plan, t)
    # Next step: running ones (a decoding, b mid-prefill) before c, still within one budget.
    plan = s.plan_step(t)
    assert plan is not None
    assert [(q.entry.request_id, n) for q, n in plan.work] == [("a", 1), ("b", 63)]
    assert c.entry.scheduled is None
    t += plan.duration
    s.finish_step(plan, t)
    # b has 74 prompt tokens left: another 63 of them, and c still waits (64 - 1 - 63 = 0 left).
    plan = s.plan_step(t)
    assert plan is not None
    assert [(q.entry.request_id, n) for q, n in plan.work] == [("a", 1), ("b", 63)]
    t += plan.duration
    s.finish_step(plan, t)
    plan = s.plan_step(t)
    assert plan is not None
    assert [(q.entry.request_id, n) for q, n in plan.work] == [("a", 1), ("b", 11), ("c", 5)]
    assert c.entry.scheduled == t
    assert plan.decode_tokens == 1 and plan.prefill_tokens == 16


# --- aborts ---------------------------------------------------------------------------------------------------


def test_abort_mid_step_takes_effect_at_the_boundary_and_the_slot_is_reused():
    cfg = config(max_num_seqs=1)
    s, _, rec = make(cfg)
    a, b = seq("a", target=100), seq("b", target=5)
    s.add(a, 0.0)
    s.add(b, 0.0)
    t = run(s, 0.0, until=lambda: a.entry.generated_tokens == 4)
    plan = s.plan_step(t)
    assert plan is not None and [q for q, _ in plan.work] == [a]
    mid = t + plan.duration / 2
    assert s.request_abort("a", mid)
    assert not s.request_abort("a", mid)  # asked once is enough
    end = t + plan.duration
    s.finish_step(plan, end)
    e = a.entry
    assert e.finish_reason == "abort"
    assert e.freed == end  # the boundary, not the moment it was asked for
    assert e.generated_tokens == 4  # the token computed in the aborted step is dropped uncounted
    assert e.last_token == t
    assert rec.times("abort_requested", "a") == [mid]
    assert rec.times("aborted", "a") == [end]
    assert rec.times("finished", "a") == []
    assert rec.steps[-1][2] == 0  # that step emitted no token at all
    assert a not in s.running
    assert b.entry.scheduled is None
    plan = s.plan_step(end)
    assert plan is not None and [q for q, _ in plan.work] == [b]
    assert b.entry.scheduled == end == a.entry.freed
    assert not s.request_abort("a", end)  # gone already


def test_abort_between_steps_is_processed_by_the_next_plan():
    s, _, _ = make(config(max_num_seqs=1))
    a = seq("a", target=100)
    s.add(a, 0.0)
    t = run(s, 0.0, until=lambda: a.entry.generated_tokens == 3)
    assert s.request_abort("a", t)
    assert s.has_pending_aborts
    assert s.plan_step(t + 0.5) is None  # nothing left to run
    assert a.entry.freed == t + 0.5 and a.entry.generated_tokens == 3 and a.entry.finish_reason == "abort"
    assert s.idle and not s.has_pending_aborts


def test_aborting_a_waiting_request_removes_it_from_the_queue():
    s, ledger, rec = make(config(max_num_seqs=1))
    a, b, c = seq("a", target=20), seq("b", target=3), seq("c", target=3)
    for q in (a, b, c):
        s.add(q, 0.0)
    t = run(s, 0.0, until=lambda: a.entry.generated_tokens == 2)
    plan = s.plan_step(t)
    assert plan is not None
    assert s.request_abort("b", t + 0.001)
    end = t + plan.duration
    s.finish_step(plan, end)
    e = b.entry
    assert e.finish_reason == "abort"
    assert e.scheduled is None and e.first_token is None
    assert e.freed == end and e.generated_tokens == 0
    assert e.queue_wait == end - e.arrival
    assert list(s.waiting) == [c]
    assert rec.times("aborted", "b") == [end]
    assert a.entry.generated_tokens == 3 and a.entry.finish_reason is None  # the running one carries on
    run(s, end)
    assert a.entry.finish_reason == "length" and a.entry.generated_tokens == 20
    assert c.entry.finish_reason == "length" and c.entry.scheduled == a.entry.freed
    assert ledger.get("b") is e


def test_abort_of_an_unknown_or_finished_request_is_refused():
    s, _, rec = make(config())
    a = seq("a", target=2)
    s.add(a, 0.0)
    run(s, 0.0)
    assert a.entry.finish_reason == "length"
    assert not s.request_abort("a", 1.0)
    assert not s.request_abort("nobody", 1.0)
    assert rec.times("abort_requested", "a") == []


# --- lengths and finish reasons -------------------------------------------------------------------------------


def test_finish_reason_stop_when_eos_comes_before_max_tokens_else_length():
    s, _, rec = make(config(output_len=LengthDistribution.parse("fixed:4"), max_num_seqs=4))
    stop = seq("stop", max_tokens=10, target=s.target_tokens(10, ignore_eos=False, min_tokens=0))
    length = seq("len", max_tokens=3, target=s.target_tokens(3, ignore_eos=False, min_tokens=0))
    forced = seq("ign", max_tokens=7, target=s.target_tokens(7, ignore_eos=True, min_tokens=0))
    for q in (stop, length, forced):
        s.add(q, 0.0)
    run(s, 0.0)
    assert (stop.entry.generated_tokens, stop.entry.finish_reason) == (4, "stop")
    assert (length.entry.generated_tokens, length.entry.finish_reason) == (3, "length")
    assert (forced.entry.generated_tokens, forced.entry.finish_reason) == (7, "length")
    for q in (stop, length, forced):
        assert rec.times("finished", q.entry.request_id) == [q.entry.freed]
        assert q.entry.last_token == q.entry.freed


def test_target_tokens_min_tokens_and_ignore_eos():
    s, _, _ = make(config(output_len=LengthDistribution.parse("fixed:8")))
    assert s.target_tokens(100, ignore_eos=False, min_tokens=0) == 8
    assert s.target_tokens(100, ignore_eos=False, min_tokens=12) == 12
    assert s.target_tokens(5, ignore_eos=False, min_tokens=0) == 5
    assert s.target_tokens(100, ignore_eos=True, min_tokens=0) == 100


@settings(max_examples=200, deadline=None)
@given(
    dist=st.sampled_from(["fixed:1", "fixed:30", "uniform:5:40", "uniform:1:1", "exponential:20", "exponential:0"]),
    max_tokens=st.integers(1, 300),
    min_frac=st.floats(0, 1),
    ignore_eos=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_target_tokens_properties(dist, max_tokens, min_frac, ignore_eos, seed):
    d = LengthDistribution.parse(dist)
    s, _, _ = make(config(output_len=d, seed=seed))
    min_tokens = int(min_frac * max_tokens)
    n = s.target_tokens(max_tokens, ignore_eos, min_tokens)
    assert 1 <= n <= max_tokens
    if ignore_eos:
        assert n == max_tokens
    else:
        assert n >= min_tokens
        if d.kind == "uniform" and min_tokens <= d.params[0] and max_tokens >= d.params[1]:
            assert d.params[0] <= n <= d.params[1]
        if d.kind == "fixed":
            assert n == min(max_tokens, max(min_tokens, d.params[0]))


def test_uniform_and_exponential_draws_have_the_right_shape():
    rng = random.Random(1)
    uni = LengthDistribution.parse("uniform:10:20")
    draws = [uni.draw(rng) for _ in range(2000)]
    assert set(draws) == set(range(10, 21))
    exp = LengthDistribution.parse("exponential:50")
    draws = [exp.draw(rng) for _ in range(5000)]
    assert min(draws) >= 1
    assert 45 < sum(draws) / len(draws) < 55


def test_same_seed_same_lengths_different_seed_different_lengths():
    def targets(seed: int) -> list[int]:
        s, _, _ = make(config(output_len=LengthDistribution.parse("exponential:100"), seed=seed))
        return [s.target_tokens(10_000, ignore_eos=False, min_tokens=0) for _ in range(50)]

    assert targets(3) == targets(3)
    assert targets(3) != targets(4)


def test_same_seed_same_schedule():
    def trace(seed: int) -> list[tuple[str, float | None, float | None, int]]:
        cfg = config(output_len=LengthDistribution.parse("uniform:1:30"), seed=seed, max_num_seqs=3)
        s, ledger, _ = make(cfg)
        for i in range(8):
            s.add(seq(f"r{i}", prompt=10 + 7 * i, max_tokens=30,
                      target=s.target_tokens(30, ignore_eos=False, min_tokens=0)), 0.0)
        run(s, 0.0)
        return [(e.request_id, e.scheduled, e.freed, e.generated_tokens) for e in ledger]

    assert trace(11) == trace(11)


# --- token accounting -----------------------------------------------------------------------------------------


def test_observer_sees_every_token_and_one_itl_sample_per_later_token():
    cfg = config(max_num_seqs=2, max_num_batched_tokens=32)
    s, ledger, rec = make(cfg)
    seqs = [seq("a", prompt=40, target=6), seq("b", prompt=3, target=9), seq("c", prompt=70, target=2)]
    for q in seqs:
        s.add(q, 0.0)
    t = run(s, 0.0, until=lambda: seqs[0].entry.generated_tokens == 3)
    assert s.request_abort("a", t)
    run(s, t)
    total = sum(e.generated_tokens for e in ledger)
    assert sum(n for _, _, n, _ in rec.steps) == total
    assert sum(len(itl) for *_, itl in rec.steps) == sum(max(0, e.generated_tokens - 1) for e in ledger)
    for plan, now, _, itl in rec.steps:
        assert now == pytest.approx(plan.started + plan.duration)
        assert all(x > 0 for x in itl)
    # Every step starts where the previous one ended, while there is work.
    for (p1, end1, _, _), (p2, _, _, _) in zip(rec.steps, rec.steps[1:], strict=False):
        assert p2.started == end1
        assert p1.prefill_tokens + p1.decode_tokens <= cfg.max_num_batched_tokens
    assert all(r <= 2 for r, _ in rec.queue)
    assert rec.queue[-1] == (0, 0)


def test_step_duration_follows_the_model():
    cfg = dataclasses.replace(config(), step_base_s=0.005, step_per_seq_s=0.0005, prefill_per_token_s=0.00001)
    assert cfg.step_duration(0, 0) == 0.005
    assert cfg.step_duration(4, 1000) == pytest.approx(0.005 + 4 * 0.0005 + 1000 * 0.00001)
