"""Counterfactual replay: exact on hand-made traces, and faithful to a real simulator run's ledger."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import pytest
from conftest import ROOT

from stopstorm.metrics.analysis.capacity import capacity_section, ledger_timeline
from stopstorm.metrics.analysis.replay import ReplayRequest, StepTiming, calibrate, replay, trace_from_ledger
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.ledger import LedgerSnapshot

STEP = 0.01


def _two_requests() -> list[ReplayRequest]:
    # One slot. "a" arrives first, its user stops after reading 3 of 10 tokens; "b" queues behind it.
    return [ReplayRequest("a", 0.0, 8, 10, stop_tokens=3, aborted_at_tokens=None),
            ReplayRequest("b", 0.001, 8, 10)]


def test_perfect_aborts_free_the_slot_one_step_after_the_stop_token() -> None:
    perfect = replay(_two_requests(), StepTiming(STEP), max_num_seqs=1, policy="perfect")
    full = replay(_two_requests(), StepTiming(STEP), max_num_seqs=1, policy="full")
    # "a" holds the slot for 3 token steps plus the step whose token the abort drops; with no stop, 10 steps.
    assert perfect.queue_wait is not None and full.queue_wait is not None
    assert perfect.queue_wait.max == pytest.approx(4 * STEP - 0.001)
    assert full.queue_wait.max == pytest.approx(10 * STEP - 0.001)
    assert perfect.generated_tokens == 13 and perfect.wasted_tokens == 0
    assert full.generated_tokens == 20 and full.wasted_tokens == 7
    assert full.slot_seconds - perfect.slot_seconds == pytest.approx(6 * STEP)


def test_recorded_policy_replays_the_server_s_own_aborts() -> None:
    zombie = [ReplayRequest("a", 0.0, 8, 10, stop_tokens=3, aborted_at_tokens=7), ReplayRequest("b", 0.0, 8, 10)]
    rec = replay(zombie, StepTiming(STEP), 1, "recorded")
    assert rec.generated_tokens == 17 and rec.wasted_tokens == 4  # read 3, generated 7


def test_timeline_counts_running_and_waiting() -> None:
    r = replay(_two_requests(), StepTiming(STEP), 1, "perfect")
    assert max(p[1] for p in r.timeline) == 1 and max(p[2] for p in r.timeline) == 1
    assert r.timeline[-1][1:] == (0, 0)


def test_unknown_policy_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="perfect"):
        replay(_two_requests(), StepTiming(STEP), 1, "sometimes")


def _ledger() -> LedgerSnapshot:
    def e(rid, arrival, sched, first, last, n, target, disc=None, reason="length"):
        return {"request_id": rid, "endpoint": "chat", "stream": True, "max_tokens": target, "arrival": arrival,
                "scheduled": sched, "first_token": first, "last_token": last,
                "freed": last + (STEP if reason == "abort" else 0), "prompt_tokens": 10, "generated_tokens": n,
                "target_tokens": target, "disconnect_seen": disc, "generated_at_disconnect": n if disc else None,
                "finish_reason": reason, "status_code": 200}
    return LedgerSnapshot.from_json({"requests": [e("x", 100.0, 100.0, 100.01, 100.05, 5, 5),
                                                  e("y", 100.02, 100.05, 100.06, 100.08, 3, 9, disc=100.081,
                                                    reason="abort")]})


def test_trace_and_calibration_from_a_ledger() -> None:
    doc = _ledger()
    trace = trace_from_ledger(doc)
    assert [(r.request_id, r.arrival, r.stop_tokens, r.aborted_at_tokens) for r in trace] == [
        ("x", 0.0, None, None), ("y", pytest.approx(0.02), 3, 3)]
    timing = calibrate(doc)
    assert timing.base_s == pytest.approx(0.01)
    with pytest.raises(ValueError, match="three tokens"):
        calibrate(LedgerSnapshot.from_json({"requests": []}))


def test_ledger_timeline_and_capacity_section() -> None:
    doc = _ledger()
    rows = ledger_timeline(doc.entries, 100.0)
    assert rows[0] == [0.0, 1, 0]
    assert [0.02, 1, 1] in rows and rows[-1][1:] == [0, 0]
    sec = capacity_section(doc, [], 100.0, 1.0, 1)
    assert sec is not None and sec.generated_tokens.value == 8
    assert sec.replay is not None and sec.replay.tokens_freed == 6  # y would have run 9 tokens, not 3
    assert capacity_section(None, [], 0.0, 1.0, 1) is None


# One seeded open-model schedule (benchmarks/bench_replay.py's raw asyncio client sends each request at its
# Poisson time, so run A and run B get the same arrivals): 60 requests at 20/s, unstopped lengths uniform 5-30
# tokens (ignore_eos), half of them stopped at a uniform point; 2 slots, 5 ms steps. B runs its slots near full
# (mean queue wait ~0.12 s against A's ~0.075 s), so the aborts make a difference the replay must predict. A and B
# run side by side (bench_replay.run_pair): run one after the other, a CI host's drift between them (a 10.4 %
# queue-wait error, from a step a few percent slower in B) was charged to the replay.
# 10 ms steps at 10 requests/s (the same seeded schedule as 5 ms at 20/s, its times doubled): on a slower CI VM
# (2026-12-04) 5 ms steps ran 6.4-8.3 % behind their schedule on an otherwise quiet machine, over LAG_MAX; a
# step's fixed overhead is half as large a share of a 10 ms step.
# 20 ms steps at 5 requests/s (times doubled again): the project's CI host (2026-12-04) ran 10 ms steps 6.3-8.6 %
# behind in all 4 tries, with nothing beside them; this machine 4.3-5.1 % at 10 ms and 2.0-2.4 % at 20 ms
# (2026-12-06, 2 pairs each, ~16 s a pair). The lag is a fixed ~0.45 ms of the simulator's own work per step.
AB = {"n": 60, "rate": 5.0, "lengths": (5, 30), "stop_probability": 0.5, "seed": 3}
AB_SEQS, AB_STEP_MS = 2, 20.0


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_replay

    return bench_replay


@pytest.fixture(scope="module")
def ab_plan(bench: ModuleType) -> list[Any]:
    return bench.schedule(**AB)


# A pair counts only if both simulators kept their step schedule: each one's step lag share (the sum of its
# steps' lateness over their modelled time, from its own /metrics: bench_replay.step_lag_share) at most
# LAG_MAX. On time it was 2.0-4.0 % here (idle, under 2 and under 5 `yes` hogs, 2026-12-04) with queue-wait
# errors within 3.3 %; when a burst of other work (the flood and browser tests beside 2 hogs) starved one
# simulator it reached 18 %, and the replay's error 14 %: queueing an on-time server's model cannot have, which
# the test would have charged to the replay. Such a pair is run again, up to AB_TRIES times in all.
LAG_MAX, AB_TRIES = 0.06, 4


@pytest.fixture(scope="module")
def ab_runs(bench: ModuleType, ab_plan: list[Any]) -> tuple[LedgerSnapshot, LedgerSnapshot]:
    """Run A (every stopped stream closed at its Stop token: prompt aborts) and run B (every stream read to its
    end, so no abort), side by side against two fresh simulators, both on schedule (LAG_MAX)."""
    seen: list[list[float]] = []
    for _ in range(AB_TRIES):
        lags: list[float] = []
        result: tuple[LedgerSnapshot, LedgerSnapshot] = bench.run_pair(ab_plan, max_num_seqs=AB_SEQS,
                                                                       step_ms=AB_STEP_MS, grace=30.0, lags=lags)
        if max(lags) <= LAG_MAX:
            return result
        seen.append(lags)
    raise AssertionError(f"in {AB_TRIES} tries the simulators never kept their step schedule (step lag shares "
                         f"A, B: {seen}; at most {LAG_MAX} counts): this machine is too loaded to compare a real "
                         "run with the replay's model")


@pytest.fixture(scope="module")
def run_a(ab_runs: tuple[LedgerSnapshot, LedgerSnapshot]) -> LedgerSnapshot:
    return ab_runs[0]


def test_replay_reproduces_a_real_simulator_run(bench: ModuleType, run_a: LedgerSnapshot) -> None:
    """An open-model run with prompt aborts against the real simulator; its ledger replayed with perfect aborts
    must give the same generated tokens and, within 10 %, the same mean queue wait and makespan."""
    measured = bench.measured(run_a)
    predicted = bench.predicted(replay(trace_from_ledger(run_a), calibrate(run_a), AB_SEQS, "perfect"))
    assert predicted["generated tokens"] == measured["generated tokens"]
    assert measured["queue wait mean s"] > 0.05  # the run did queue: the figure means something
    for key in ("queue wait mean s", "makespan s", "slot-seconds"):
        assert predicted[key] == pytest.approx(measured[key], rel=0.10), key


@pytest.mark.slow
def test_replay_of_a_predicts_run_b_without_aborts(bench: ModuleType, ab_plan: list[Any],
                                                   ab_runs: tuple[LedgerSnapshot, LedgerSnapshot]) -> None:
    """The counterfactual itself, A/B: run B is the same seeded schedule with every stream read to its end (no
    Stop, so no abort) against a fresh simulator; run A's ledger alone, replayed under `full` (nobody stops),
    must predict B's queue wait, mean and p95, from B's own ledger, within the 10 % that docs/benchmarks/replay.md
    claims (measured at 300 requests). At this size (60 requests, ~4 s for the pair at the 5 ms steps of then,
    ~16 s at today's 20 ms) the errors measured on this shared 2-core machine, A and B side by side, were at
    most 0.8 % (mean) and 1.1 % (p95) idle, 4.2 % and 2.7 %
    under two CPU hogs (10 pairs, 2026-12-03; run one after the other they reached 3.3 % idle here and 10.4 % on a
    CI host). What the aborts saved (B's mean queue wait less A's), a difference of two such figures, must come
    within 25 % (measured errors −10.5 % to +4.5 %).

    Checked by breaking the replay (metrics/analysis/replay.py, reverted): `full` aborting at the Stop token as
    `perfect` does, and a calibrated step 15 % too long; this test failed both ways (2026-12-02).
    """
    run_a, real_b = ab_runs
    timing, trace = calibrate(run_a), trace_from_ledger(run_a)
    full = bench.predicted(replay(trace, timing, AB_SEQS, "full"))
    perfect = bench.predicted(replay(trace, timing, AB_SEQS, "perfect"))
    a, b = bench.measured(run_a), bench.measured(real_b)
    # B read every stream to its planned length (ignore_eos): its tokens are known before it runs
    assert b["generated tokens"] == full["generated tokens"] == sum(p.max_tokens for p in ab_plan)
    assert not any(e.finish_reason == "abort" for e in real_b.served)
    # The aborts made a difference this test can see: B queued clearly longer than A
    assert b["queue wait mean s"] > 1.3 * a["queue wait mean s"] > 0.05, (a, b)
    for key in ("queue wait mean s", "queue wait p95 s", "makespan s", "slot-seconds"):
        assert full[key] == pytest.approx(b[key], rel=0.10), (key, full[key], b[key])
    saved_real = b["queue wait mean s"] - a["queue wait mean s"]
    saved_replay = full["queue wait mean s"] - perfect["queue wait mean s"]
    assert saved_replay == pytest.approx(saved_real, rel=0.25), (saved_replay, saved_real)


def test_horizon_cuts_every_policy_where_the_real_run_ended() -> None:
    # The run ended at 0.05 s: "b" was still queued then, and the run's end took it away in every policy.
    for policy in ("perfect", "full"):
        r = replay(_two_requests(), StepTiming(STEP), 1, policy, horizon=0.05)
        assert r.queue_wait is not None
        assert r.queue_wait.max == pytest.approx(min(4 * STEP if policy == "perfect" else 0.05, 0.05) - 0.001,
                                                 abs=STEP), policy
        assert r.makespan_s <= 0.05 + STEP


def test_a_disconnect_at_the_run_s_end_is_not_a_stop() -> None:
    doc = _ledger()
    trace = trace_from_ledger(doc, cut_at=100.08)  # y's disconnect came with the run's end
    assert trace[1].stop_tokens is None and trace[1].aborted_at_tokens is None


def test_the_run_s_cut_is_the_first_disconnect_no_user_reported() -> None:
    from stopstorm.metrics.analysis.replay import run_cut_time

    doc = _ledger()  # y disconnected at 100.081 and no record reports it: a user killed at the run's end
    reported_x = StreamRecord(stack="requests", close_mode="none", endpoint="chat", request_id="x",
                              stop_plan="never", wall_start=0.0, sent=100.0)
    assert run_cut_time(doc, [reported_x], run_end=100.5) == pytest.approx(100.081)
    assert run_cut_time(doc, [], run_end=100.5) == 100.5


def test_what_if_from_a_saved_report(tmp_path, capsys) -> None:
    import json

    from stopstorm.metrics.report.replay_table import main

    doc = _ledger()
    report = tmp_path / "r.json"
    sec = capacity_section(doc, [], 100.0, 1.0, 1)
    assert sec is not None
    report.write_text(json.dumps({"capacity": sec.to_json()}))
    assert main([str(report), "--max-num-seqs", "2"]) == 0
    out = capsys.readouterr().out
    assert "max_num_seqs 2" in out and "| full |" in out and "| perfect |" in out
    empty = tmp_path / "e.json"
    empty.write_text("{}")
    with pytest.raises(SystemExit, match=r"no capacity\.replay\.trace"):
        main([str(empty)])
