"""The probe's real-vLLM truth (vLLM's log + /metrics around one stream), checked against the simulator's ledger.

The simulator writes vLLM's log lines and serves vLLM's metrics, so the same reader runs on it, and its ledger
says what really happened to each request. (Against real vLLM: tests/test_real_vllm.py.)
"""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (gevent monkey-patches the process, as under Locust)

from collections.abc import Iterator

import pytest
from conftest import FAST, SimHandle, SimPool
from stream_tools import Streams, make_settings

from stopstorm.metrics.truth.vllm_stream import VllmStreamTruth
from stopstorm.users.policy import StopPlan

SIM_ARGS = (*FAST, "--max-num-seqs", "2")


@pytest.fixture(scope="module")
def truth(sim_pool: SimPool) -> Iterator[tuple[SimHandle, VllmStreamTruth, Streams]]:
    sim = sim_pool.fresh(*SIM_ARGS)
    t = VllmStreamTruth(sim.url, sim.log_path)
    assert t.available()
    t.start()
    streams = Streams()
    yield sim, t, streams
    streams.close()
    t.close()


@pytest.mark.parametrize(("mode", "plan", "max_tokens", "reason"), [
    ("close", StopPlan(tokens=10), 2000, "abort"),
    ("hold", StopPlan(tokens=10), 2000, "abort"),
    ("hold", StopPlan(tokens=5), 20, "length"),  # the hold outlasts the request: it runs to its end unread
    ("none", StopPlan(tokens=5), 30, "length"),
])
def test_truth_per_stream_equals_the_ledger(truth, mode: str, plan: StopPlan, max_tokens: int, reason: str):
    sim, t, streams = truth
    t.before_stream()
    record = streams.run("requests", make_settings(sim.url, max_tokens=max_tokens, hold_seconds=0.3), mode, plan)
    sid = record.server_id or "chatcmpl-" + record.request_id
    entry = t.settle(sid, timeout=10.0)
    ledger = sim.wait_entry(sid)
    assert entry["finish_reason"] == ledger["finish_reason"] == reason
    assert entry["generated_tokens"] == ledger["generated_tokens"]  # Δ generation_tokens_total, exact
    assert entry["log_added"]
    if reason == "abort":
        assert entry["success_delta"] == {}  # the blind spot, as in vLLM
        # the abort line is read after the close was seen, within the follower's polls
        assert ledger["disconnect_seen"] <= entry["freed"] <= ledger["disconnect_seen"] + 0.2
    else:
        assert entry["success_delta"] == {reason: 1.0} and entry["freed"] is None
