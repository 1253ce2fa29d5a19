"""Abort accounting: unit tests on synthetic records and ledgers, then each close mode against the simulator.

The integration tests drive streams through the stacks' transports as tests/test_stacks.py does, and check the
accounting against numbers each test fixes in advance, not against the accounting's own formula derived again:
streams of a known length (max_tokens, ignore_eos) stopped at a known token (tokens:fixed), so the tokens read,
the goodput and the wasted tokens each close mode implies are constants (close 0; none and a hold past the
stream's end max_tokens − Stop; a hold within the stream bounded by its length over the engine's pace), and the
ledger shows the server did what each close mode must (DESIGN.md §5). A figure consistent with the ledger but
wrong about the world still fails: with the client's Stop moved one token late (users/core.py, reverted), the
close, drop and hold tests failed here, where the formula-based check they replace had passed.
"""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (gevent monkey-patches the process, as under Locust)

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import gevent
import pytest
from conftest import FAST, ROOT, SimHandle, SimPool
from stream_tools import CLOSE_SIM_ARGS, Streams, check_abort_at_next_step, check_no_waste, engine_lag, make_settings

from stopstorm.metrics.analysis.accounting import Accounting, Figures, account, server_id
from stopstorm.metrics.figures import (
    CLIENT_ESTIMATE,
    CLIENT_SOURCE,
    LEDGER_SOURCE,
    METRICS_SOURCE,
    UNAVAILABLE,
    Distribution,
    distribution,
)
from stopstorm.metrics.record import INTERRUPTED, StreamRecord
from stopstorm.metrics.report.console import format_accounting
from stopstorm.metrics.report.json_file import read_report, write_report
from stopstorm.metrics.report.model import REPORT_SCHEMA_VERSION, Report, RunMeta, report_to_json
from stopstorm.metrics.truth.ledger import LedgerSnapshot
from stopstorm.metrics.truth.vllm_metrics import EngineDelta, MetricsDelta
from stopstorm.users.policy import StopPlan

# --- synthetic records and ledger entries ----------------------------------------------------------------------


def rec(rid: str, mode: str = "close", stack: str = "requests", *, stop: float | None = 1.0,
        tokens_at_stop: int | None = 10, tokens: int = 10, error: str | None = None, endpoint: str = "chat",
        server: str | None = None, headers: float | None = 0.01, first_token: float | None = 0.05) -> StreamRecord:
    return StreamRecord(stack=stack, close_mode=mode, endpoint=endpoint, request_id=rid, stop_plan="tokens:10",
                        wall_start=0.0, sent=0.0, server_id=server, headers=headers, first_token=first_token,
                        stop=stop, tokens_at_stop=tokens_at_stop if stop is not None else None, tokens=tokens,
                        error=error)


def entry(rid: str, *, arrival: float = 0.0, scheduled: float | None = 0.02, first: float | None = 0.05,
          last: float | None = 1.0, freed: float | None = 1.002, generated: int = 12, target: int = 100,
          reason: str | None = "abort", prefix: str = "chatcmpl-") -> dict[str, Any]:
    return {"request_id": prefix + rid, "endpoint": "chat", "stream": True, "prompt_tokens": 10,
            "max_tokens": target, "target_tokens": target, "arrival": arrival, "scheduled": scheduled,
            "first_token": first, "last_token": last, "disconnect_seen": None, "freed": freed,
            "generated_tokens": generated, "finish_reason": reason}


def ledger(*entries: dict[str, Any]) -> LedgerSnapshot:
    """A ledger as the simulator's HTTP API would send it, read the way a run reads it."""
    return LedgerSnapshot.from_json({"requests": list(entries)})


def cell(acc: Accounting, stack: str, mode: str) -> Figures:
    found = [c.figures for c in acc.cells if (c.stack, c.close_mode) == (stack, mode)]
    assert len(found) == 1, [(c.stack, c.close_mode) for c in acc.cells]
    return found[0]


def dist(fig: Any) -> Distribution:
    assert isinstance(fig.value, Distribution), fig
    return fig.value


def test_distribution_percentiles() -> None:
    assert distribution([]) is None
    one = distribution([0.5])
    assert one is not None and one.p50 == one.p99 == one.max == 0.5 and one.count == 1
    d = distribution([float(i) for i in range(101)])  # 0..100: rank-interpolated percentiles are the values
    assert d is not None and (d.p50, d.p90, d.p95, d.p99, d.max, d.mean) == (50, 90, 95, 99, 100, 50)


def test_join_by_server_id_or_derived_id() -> None:
    assert server_id(rec("a")) == "chatcmpl-a"
    assert server_id(rec("a", endpoint="completions")) == "cmpl-a"
    assert server_id(rec("a", server="chatcmpl-other")) == "chatcmpl-other"
    records = [rec("a"), rec("b", endpoint="completions"), rec("c", server="chatcmpl-xyz")]
    led = ledger(entry("a"), entry("b", prefix="cmpl-"), entry("xyz"))
    acc = account(records, led, None, 10.0)
    assert acc.overall.aborted.value == 3
    assert acc.run.unjoined_streams.value == 0 and acc.run.unmatched_requests.value == 0


def test_abort_latency_wasted_and_counts() -> None:
    records = [
        rec("a", stop=1.0, tokens_at_stop=10, tokens=10),  # aborted 5 ms after Stop
        rec("b", stop=2.0, tokens_at_stop=20, tokens=20),  # aborted 15 ms after Stop
        rec("c", mode="none", stop=1.0, tokens_at_stop=5, tokens=40),  # read on to the end
        rec("d", stop=None, tokens=30),  # never stopped
        rec("e", stop=None, tokens=3, error="connection error: boom"),
        rec("f", stop=None, tokens=0, error="connection error: boom"),
    ]
    led = ledger(
        entry("a", freed=1.005, generated=11),
        entry("b", freed=2.015, generated=22),
        entry("c", freed=1.3, generated=40, target=40, reason="length"),
        entry("d", freed=1.5, generated=30, target=30, reason="length"),
        entry("e", freed=0.5, generated=8, reason="abort"),
        entry("f", scheduled=None, first=None, last=None, freed=0.1, generated=0, reason="abort"),
        entry("ghost", reason="abort"),  # a user killed at the run's end: no record
    )
    acc = account(records, led, None, 10.0)
    close = cell(acc, "requests", "close")
    assert (close.streams.value, close.stopped.value, close.aborted.value) == (5, 2, 2)
    lat = dist(close.abort_latency)
    assert lat.count == 2 and lat.p50 == pytest.approx(0.010) and lat.max == pytest.approx(0.015)
    assert close.abort_latency.source == LEDGER_SOURCE and close.abort_latency.unit == "s"
    # generated − read per stream: a 1, b 2, d 0, e 8 − 3 = 5, f 0
    assert close.wasted_tokens.value == 1 + 2 + 0 + 5 + 0
    assert close.failed.value == 2 and close.failures.value == {"connection error: boom": 2}
    none = cell(acc, "requests", "none")
    assert none.aborted.value == 0 and none.abort_latency.value is None
    assert none.abort_latency.source == UNAVAILABLE
    assert none.wasted_tokens.value == 35  # read 5 of 40
    assert acc.overall.wasted_tokens.value == 8 + 35
    assert acc.overall.goodput_tokens.value == 10 + 20 + 5 + 30 + 3 + 0
    assert acc.overall.goodput_rate.value == pytest.approx(68 / 10.0)
    assert acc.run.ledger_aborts.value == 5 and acc.run.unmatched_requests.value == 1
    assert acc.run.vllm_counted_aborts.value is None and acc.run.blind_spot.value is None
    # The run's queue wait is every request the ledger served, the ghost no stream reported included; f was
    # never scheduled, so it waited until it left the queue (0.1 s). A cell's is its own streams' only.
    qw = dist(acc.overall.queue_wait)
    assert qw.count == 7 and qw.p50 == pytest.approx(0.02) and qw.max == pytest.approx(0.1)
    assert dist(close.queue_wait).count == 5


def test_zombie_definition() -> None:
    grace = 0.1
    records = [
        rec("quick", stop=1.0),  # freed 50 ms after Stop: not a zombie
        rec("edge", stop=1.0),  # freed just within the grace: not a zombie
        rec("late", stop=1.0),  # freed 0.5 s after Stop: zombie for 0.5 slot-s
        rec("running", stop=1.0),  # still running at the run's end (3.0): zombie for 2 slot-s
        rec("queued", stop=1.0),  # never got a slot: not a zombie, whatever its fate
        rec("admitted-later", stop=1.0),  # scheduled after Stop: zombie from its scheduling
        rec("full", stop=None),  # never stopped: never a zombie
    ]
    led = ledger(
        entry("quick", freed=1.05), entry("edge", freed=1.09), entry("late", freed=1.5),
        entry("running", freed=None, reason=None),
        entry("queued", scheduled=None, first=None, last=None, freed=2.0, generated=0),
        entry("admitted-later", arrival=0.0, scheduled=1.2, first=1.25, last=1.6, freed=1.6, reason="stop"),
        entry("full", freed=5.0, reason="length"),
    )
    acc = account(records, led, None, 3.0, zombie_grace_s=grace, run_end=3.0)
    f = cell(acc, "requests", "close")
    assert f.zombies.value == 3
    assert f.zombie_slot_seconds.value == pytest.approx(0.5 + 2.0 + 0.4)
    assert f.zombie_slot_seconds.unit == "slot-s" and f.zombies.source == LEDGER_SOURCE
    # A wider grace forgives the late one
    acc = account(records, led, None, 3.0, zombie_grace_s=0.6, run_end=3.0)
    assert cell(acc, "requests", "close").zombies.value == 2
    # Without run_end the latest ledger mark (5.0) ends the still-running one
    acc = account(records, led, None, 3.0, zombie_grace_s=grace)
    assert cell(acc, "requests", "close").zombie_slot_seconds.value == pytest.approx(0.5 + 4.0 + 0.4)


def test_freed_throughput_counterfactual() -> None:
    records = [rec("a"), rec("b"), rec("one"), rec("done", mode="none")]
    led = ledger(
        # 21 tokens from 1.0 to 1.2: 10 ms a token; 79 more would have taken 0.79 slot-s
        entry("a", first=1.0, last=1.2, generated=21, target=100),
        # already at its target when aborted: nothing freed
        entry("b", first=1.0, last=1.5, generated=50, target=50),
        # one token: its pace is unknown, tokens count but slot-seconds cannot
        entry("one", first=1.0, last=1.0, generated=1, target=11),
        # not aborted: not part of what aborts freed
        entry("done", generated=40, target=40, reason="length"),
    )
    acc = account(records, led, None, 4.0)
    close = cell(acc, "requests", "close")
    assert close.freed_tokens.value == 79 + 0 + 10
    assert close.freed_slot_seconds.value == pytest.approx(0.79)
    assert close.freed_slot_seconds.note is not None and "1 request(s)" in close.freed_slot_seconds.note
    assert acc.run.freed_tokens_rate.value == pytest.approx(89 / 4.0)
    assert cell(acc, "requests", "none").freed_tokens.value == 0
    assert cell(acc, "requests", "none").freed_slot_seconds.value == 0.0
    # Only an unknown pace to go on: unknown, not 0
    acc = account([rec("one")], ledger(entry("one", first=1.0, last=1.0, generated=1, target=11)), None, 1.0)
    assert acc.overall.freed_tokens.value == 10 and acc.overall.freed_slot_seconds.value is None


def delta(generation: float | None, success: dict[str, float] | None) -> MetricsDelta:
    total = EngineDelta(generation_tokens=generation,
                        success=None if success is None else MappingProxyType(success))
    return MetricsDelta(0.0, 10.0, MappingProxyType({}), total)


def test_no_ledger_is_unknown_not_zero() -> None:
    records = [rec("a", tokens=10, tokens_at_stop=10, headers=0.01, first_token=0.21), rec("b", stop=None)]
    acc = account(records, None, None, 0.0)
    f = acc.overall
    for name in ("aborted", "abort_latency", "wasted_tokens", "zombies", "zombie_slot_seconds", "freed_tokens",
                 "freed_slot_seconds", "goodput_rate"):
        fig = getattr(f, name)
        assert fig.value is None and fig.source == UNAVAILABLE, (name, fig)
    assert f.streams.value == 2 and f.streams.source == CLIENT_SOURCE
    assert f.goodput_tokens.value == 20
    qw = dist(f.queue_wait)
    assert f.queue_wait.source == CLIENT_ESTIMATE and qw.max == pytest.approx(0.2)
    assert acc.run.blind_spot.value is None and acc.run.ledger_aborts.value is None
    assert CLIENT_ESTIMATE in acc.sources and LEDGER_SOURCE not in acc.sources


def test_metrics_only_wasted_is_an_aggregate() -> None:
    records = [rec("a", tokens=10), rec("b", mode="none", tokens=40, tokens_at_stop=5)]
    acc = account(records, None, delta(120.0, {"stop": 1.0, "length": 1.0}), 10.0)
    w = acc.overall.wasted_tokens
    assert w.value == 120.0 - 50 and w.source == METRICS_SOURCE and "aggregate" in (w.note or "")
    assert cell(acc, "requests", "close").wasted_tokens.value is None  # no per-cell split from counters
    assert acc.run.vllm_counted_aborts.value == 0.0  # exposed, no abort sample: vLLM counted none
    # A server that does not expose the counter: unknown
    assert account(records, None, delta(None, None), 10.0).overall.wasted_tokens.value is None


def test_blind_spot_finding() -> None:
    records = [rec("a"), rec("b")]
    led = ledger(entry("a"), entry("b"), entry("killed"))
    acc = account(records, led, delta(100.0, {"stop": 2.0, "abort": 0.0}), 5.0)
    assert acc.run.blind_spot.value == "3 aborts, vLLM counted 0"
    assert acc.run.vllm_counted_aborts.source == METRICS_SOURCE
    # With the ledger, wasted tokens stay per stream and exact
    assert acc.overall.wasted_tokens.source == LEDGER_SOURCE


def every_figure(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    figs = [(f"{c['stack']}/{c['close_mode']}/{n}", f) for c in doc["cells"] for n, f in c["figures"].items()]
    figs += [(f"overall/{n}", f) for n, f in doc["overall"]["figures"].items()]
    figs += [(f"run/{n}", f) for n, f in doc["run"]["figures"].items()]
    return figs


def test_report_json_and_summary(tmp_path: Path) -> None:
    records = [rec("a"), rec("b", mode="hold", stop=1.0), rec("c", stop=None, error="HTTP 500: x")]
    led = ledger(entry("a"), entry("b", freed=1.6), entry("c", reason="abort"))
    acc = account(records, led, delta(50.0, {}), 2.0)
    report = Report(RunMeta(host="http://x"), acc)
    doc = report_to_json(report)
    assert doc["schema_version"] == REPORT_SCHEMA_VERSION and doc["meta"]["host"] == "http://x"
    figs = every_figure(doc)
    # 24 figures a cell and overall (interrupted and ttft among them; the 6 closed-stop classes of closes.py),
    # 9 run-wide
    assert len(figs) == 3 * 24 + 9
    for name, fig in figs:
        assert {"value", "unit", "source"} <= fig.keys(), name
    assert doc["overall"]["figures"]["abort_latency"]["value"]["count"] == 2
    path = tmp_path / "sub" / "r.json"
    write_report(path, report)
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))
    assert os.listdir(path.parent) == ["r.json"]  # no temp file left behind
    assert read_report(path) == report  # the file reads back as the same Report, figure for figure
    text = format_accounting(acc)
    assert "requests  close" in text and "requests  hold" in text
    assert "3 aborts, vLLM counted 0" in text and "HTTP 500: x" in text
    assert "queue wait p50 / p95" in text and "goodput" in text
    # Nothing known: dashes, not zeros
    bare = format_accounting(account([rec("z")], None, None, 0.0))
    assert "–" in bare and "unknown" in bare
    # Streams the run's end cut are counted apart from failures
    cut = format_accounting(account([rec("c1", error=INTERRUPTED), rec("c2", error=INTERRUPTED),
                                  rec("f1", error="HTTP 503: y")], None, None, 1.0))
    assert "cut by the run's end:   2 streams (recorded, not failures)" in cut
    assert "failed streams:" in cut and "HTTP 503: y" in cut and INTERRUPTED not in cut


# --- against the simulator ---------------------------------------------------------------------------------------

SIM_ARGS = (*FAST, "--max-num-seqs", "16")  # as tests/test_stacks.py: one shared simulator process
N = 3
STOP_AT = 20
HOLD_S = 0.5
LONG = 2000  # max_tokens with ignore_eos: no stream reaches it while we watch
STACKS = ("requests", "httpx-async")


@pytest.fixture(scope="module")
def streams() -> Any:
    s = Streams()
    yield s
    s.close()


@dataclass
class ModeRun:
    sim: SimHandle
    records: list[StreamRecord]
    entries: dict[str, Any]
    acc: Accounting
    lag_s: float  # what the engine's steps ran late in all during the run, by its own measure

    def one_step(self) -> float:
        """One modelled step with every slot running (no lag, no slack)."""
        return self.sim.config.step_duration(self.sim.config.max_num_seqs, 0)

    def entry(self, record: StreamRecord) -> dict[str, Any]:
        return self.entries[server_id(record)]


def run_mode(sim_pool: SimPool, streams: Streams, stack: str, mode: str, plan: StopPlan,
             sim_args: tuple[str, ...] = SIM_ARGS, hold_s: float = HOLD_S, **options: Any) -> ModeRun:
    """N streams at once in one close mode, on an idle simulator with an empty ledger; then the accounting."""
    sim = sim_pool.fresh(*sim_args)
    settings = make_settings(sim.url, close_mix=f"{mode}:1", hold_seconds=hold_s, **options)
    lag_before = engine_lag(sim.http.get("/stopstorm/stats").raise_for_status().json())
    began = time.monotonic()
    jobs = [gevent.spawn(streams.run, stack, settings, mode, plan) for _ in range(N)]
    gevent.joinall(jobs, timeout=20, raise_error=True)
    records = [j.value for j in jobs]
    for r in records:
        assert r is not None and r.error is None and r.stopped, r
    entries = sim.wait_idle()
    doc = sim.ledger()
    acc = account(records, LedgerSnapshot.from_json(doc), None, time.monotonic() - began)
    assert len(entries) == N and acc.run.unjoined_streams.value == 0
    lag_s = engine_lag(sim.http.get("/stopstorm/stats").raise_for_status().json()) - lag_before
    return ModeRun(sim, records, entries, acc, lag_s)


def check_truth(stack: str, mode: str, run: ModeRun, *, read: int, wasted: int | None) -> Figures:
    """What the accounting must say, against numbers the test fixed in advance rather than derived again with
    the accounting's own formula (generated − read): every stream stopped at `read` tokens (tokens:fixed), so
    goodput is N × read, and `wasted` is the constant the close mode implies (close 0; none max_tokens − read a
    stream; hold past the stream's end the same); None for a figure the caller bounds itself."""
    f = cell(run.acc, stack, mode)
    assert f.streams.value == f.stopped.value == N
    assert [r.tokens_read for r in run.records] == [read] * N
    assert f.goodput_tokens.value == N * read
    if wasted is not None:
        assert f.wasted_tokens.value == wasted
    aborted = [r for r in run.records if run.entry(r)["finish_reason"] == "abort"]
    assert f.aborted.value == len(aborted)
    if aborted:
        expected = sorted(run.entry(r)["freed"] - r.stop for r in aborted)
        lat = dist(f.abort_latency)
        assert lat.count == len(aborted) and lat.max == pytest.approx(expected[-1], abs=1e-9)
    return f


def check_prompt_close(stack: str, mode: str, run: ModeRun) -> Figures:
    """close, or a drop that closes at once: each abort at the next step boundary (the ledger's stamps), and
    nothing wasted: the server generated the 20 tokens each user read, no more (stream_tools.check_no_waste:
    the one exception is a client that let a step end before its close reached the server, counted here).

    Checked by deferring every abort one step in simulator/engine.py (counting the step's token, or dropping
    it and freeing the slot a step late): both failed here for both stacks (2026-12-02)."""
    step = run.one_step()
    unread = 0
    for r in run.records:
        check_abort_at_next_step(run.entry(r), step, run.lag_s)
        unread += check_no_waste(run.entry(r), r, step)
    f = check_truth(stack, mode, run, read=STOP_AT, wasted=unread)  # 0 unless a client fell behind
    assert f.aborted.value == N
    if unread == 0:
        assert dist(f.abort_latency).max <= step + run.lag_s  # Stop → freed inside the step after the last read
    assert f.zombies.value == 0 and f.zombie_slot_seconds.value == 0
    # Each would have run to max_tokens (ignore_eos): the counterfactual is exactly the rest of it
    assert f.freed_tokens.value == N * (LONG - STOP_AT) - unread
    return f


@pytest.mark.parametrize("stack", STACKS)
def test_close_frees_every_slot_within_a_step(sim_pool: SimPool, streams: Streams, stack: str) -> None:
    """Three streams at once, each closed at token 20 of 2000, at the default 15 ms step (the README's)."""
    run = run_mode(sim_pool, streams, stack, "close", StopPlan(tokens=STOP_AT), sim_args=CLOSE_SIM_ARGS)
    f = check_prompt_close(stack, "close", run)
    slot_s = f.freed_slot_seconds.value
    assert isinstance(slot_s, float)
    base = run.sim.config.step_base_s
    assert 0.5 * base * f.freed_tokens.value <= slot_s <= 3 * base * f.freed_tokens.value


def test_drop_with_requests_behaves_like_close(sim_pool: SimPool, streams: Streams) -> None:
    run = run_mode(sim_pool, streams, "requests", "drop", StopPlan(tokens=STOP_AT), sim_args=CLOSE_SIM_ARGS)
    check_prompt_close("requests", "drop", run)


@pytest.mark.parametrize("stack", STACKS)
def test_hold_makes_zombies_for_the_hold(sim_pool: SimPool, streams: Streams, stack: str) -> None:
    """Held 0.5 s, a stream keeps generating for nobody at the engine's pace, then the release aborts it. The
    wasted tokens are bounded by constants: at most one per modelled step (steps never end early) over the hold,
    the release's close and the step that frees; at least one per step at half the pace."""
    run = run_mode(sim_pool, streams, stack, "hold", StopPlan(tokens=STOP_AT))
    f = check_truth(stack, "hold", run, read=STOP_AT, wasted=None)
    step = run.sim.step_bound(running=run.sim.config.max_num_seqs)
    fastest = run.sim.config.step_duration(1, 0)
    assert f.aborted.value == N  # aborted at the release, not at Stop
    assert f.zombies.value == N
    slot_s = f.zombie_slot_seconds.value
    assert isinstance(slot_s, float)
    assert N * (HOLD_S - 0.002) <= slot_s <= N * (HOLD_S + step + 0.050)
    lat = dist(f.abort_latency)
    assert HOLD_S - 0.002 <= lat.p50 <= HOLD_S + step + 0.050
    wasted = f.wasted_tokens.value
    assert isinstance(wasted, int)
    assert N * int(0.5 * HOLD_S / step) <= wasted <= N * (int((HOLD_S + 0.050 + step + run.lag_s) / fastest) + 1)
    for r in run.records:
        check_abort_at_next_step(run.entry(r), run.one_step(), run.lag_s)  # the release: a prompt abort


def test_hold_past_the_end_wastes_the_rest(sim_pool: SimPool, streams: Streams) -> None:
    """A hold that outlasts the stream: 40 tokens asked, Stop at 10, then 30 more at ~5 ms a step (0.15 s) into a
    1 s hold, so the server runs it to its end unaborted and exactly 30 tokens a stream are wasted."""
    run = run_mode(sim_pool, streams, "requests", "hold", StopPlan(tokens=10), hold_s=1.0, max_tokens=40)
    f = check_truth("requests", "hold", run, read=10, wasted=N * (40 - 10))
    assert f.aborted.value == 0 and f.freed_tokens.value == 0
    assert f.zombies.value == N
    assert {(e["finish_reason"], e["generated_tokens"]) for e in run.entries.values()} == {("length", 40)}


@pytest.mark.parametrize("stack", STACKS)
def test_none_reads_on_and_wastes_the_rest(sim_pool: SimPool, streams: Streams, stack: str) -> None:
    run = run_mode(sim_pool, streams, stack, "none", StopPlan(tokens=10), max_tokens=60)
    f = check_truth(stack, "none", run, read=10, wasted=N * (60 - 10))
    assert f.aborted.value == 0 and f.abort_latency.value is None
    assert {(e["finish_reason"], e["generated_tokens"]) for e in run.entries.values()} == {("length", 60)}
    assert f.freed_tokens.value == 0
    # 50 more tokens of ≥ 5 ms after Stop: every one held its slot past the grace
    assert f.zombies.value == N


# --- end to end under Locust ------------------------------------------------------------------------------------


def test_locust_run_prints_and_writes_the_report(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "3", "-r", "3", "-t", "5s",
           "RequestsUser", "--sim-args", "--step-base-ms 5", "--think-time", "0.1", "--stop-probability", "1",
           "--close-mix", "close:1,hold:1", "--hold-seconds", "0.5", "--stopstorm-report", str(report)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STOPSTORM_", "LOCUST_"))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=60, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    assert "Response time percentiles" in out and "stopstorm abort accounting" in out, out[-3000:]
    assert out.index("stopstorm abort accounting") > out.index("Response time percentiles")
    assert out.index("stopstorm abort accounting") < out.index("stopped the embedded simulator")
    assert "vLLM blind spot" in out and "vLLM counted 0" in out
    doc = json.loads(report.read_text())
    assert doc["schema_version"] == REPORT_SCHEMA_VERSION
    overall = doc["overall"]["figures"]
    assert overall["streams"]["value"] > 0
    assert overall["aborted"]["source"] == LEDGER_SOURCE
    modes = {c["close_mode"] for c in doc["cells"]}
    # Every user means to stop (--stop-probability 1); streams that ended before their Stop point, or that the
    # run's end cut, were never stopped: filed once as "not stopped", not under a close mode they never used
    assert modes <= {"close", "hold", "not stopped"} and "close" in modes
    for c in doc["cells"]:
        f = c["figures"]
        if c["close_mode"] == "not stopped":
            assert f["stopped"]["value"] == 0 and f["aborted"]["value"] == 0, c
        else:
            assert f["stopped"]["value"] == f["streams"]["value"], c
    for name, fig in every_figure(doc):
        assert {"value", "unit", "source"} <= fig.keys(), name


@pytest.mark.slow
def test_locust_run_follows_the_server_log_and_scrapes_metrics(tmp_path: Path) -> None:
    """--server-log on the embedded simulator's (vLLM-shaped) log: the log's aborts agree with the ledger's."""
    report, sim_log = tmp_path / "r.json", tmp_path / "sim.log"
    cmd = [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "3", "-r", "3", "-t", "4s",
           "RequestsUser", "--sim-args", "--step-base-ms 5", "--think-time", "0.1", "--stop-probability", "1",
           "--close-mix", "close:1", "--sim-log", str(sim_log), "--server-log", str(sim_log),
           "--metrics-interval", "0.1", "--stopstorm-report", str(report)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STOPSTORM_", "LOCUST_"))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=60, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    doc = json.loads(report.read_text())
    assert "vLLM log" in doc["sources"] and "vLLM metrics" in doc["sources"]
    meta = doc["meta"]
    assert meta["server_log"]["path"] == str(sim_log) and meta["server_log"]["events"] > 0
    assert meta["server_log"]["errors"] == 0
    assert meta["metrics"]["scrapes"] >= 10 and meta["metrics"]["errors"] == 0  # 0.1 s over ~4 s
    o, run = doc["overall"]["figures"], doc["run"]["figures"]
    assert o["aborted"]["source"] == LEDGER_SOURCE and o["log_aborted"]["source"] == "vLLM log"
    assert o["aborted"]["value"] > 0
    assert o["log_aborted"]["value"] == o["aborted"]["value"], (o["aborted"], o["log_aborted"])
    for c in doc["cells"]:
        assert c["figures"]["log_aborted"]["value"] == c["figures"]["aborted"]["value"], c
    # every abort in the ledger (users killed at the end included) was logged and read
    assert run["log_aborts"]["value"] == run["ledger_aborts"]["value"]
    # Stop → abort logged (read) comes no sooner than Stop → slot freed, and within the follower's poll + slack
    log_lat, led_lat = o["log_abort_latency"]["value"], o["abort_latency"]["value"]
    assert log_lat["count"] == led_lat["count"] == o["aborted"]["value"]
    assert log_lat["p50"] >= led_lat["p50"] - 0.005 and log_lat["max"] < 1.0
    assert "Stop → abort logged" in out
