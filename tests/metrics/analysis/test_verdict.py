"""The verdict, the summary block, the run over time and the bootstrap: pure functions over made-up records and
ledgers (test data, not measurements), each rule checked where it turns."""

from __future__ import annotations

from typing import Any

import pytest

from stopstorm.metrics.analysis.accounting import NOT_STOPPED, account, by_outcome
from stopstorm.metrics.analysis.over_time import bin_width, over_time
from stopstorm.metrics.analysis.verdict import (
    CapacitySearch,
    SearchStep,
    Summary,
    Verdict,
    bootstrap_difference,
    bootstrap_interval,
    few_requests,
    run_summary,
    step_bound,
    verdict,
)
from stopstorm.metrics.figures import Distribution
from stopstorm.metrics.record import INTERRUPTED, StreamRecord
from stopstorm.metrics.truth.ledger import LedgerSnapshot


def rec(rid: str, stack: str = "requests", mode: str = "close", stop: float | None = 1.0, tokens: int = 10,
        error: str | None = None, sent: float = 0.0) -> StreamRecord:
    times = [sent + 0.1 + 0.01 * k for k in range(tokens)]
    return StreamRecord(stack=stack, close_mode=mode, endpoint="chat", request_id=rid, stop_plan="tokens:10",
                        wall_start=0.0, sent=sent, first_token=times[0] if times else None, chunk_times=times,
                        chunk_tokens=list(range(1, tokens + 1)), stop=stop,
                        tokens_at_stop=tokens if stop is not None else None, tokens=tokens, error=error)


def entry(rid: str, freed: float, reason: str, generated: int = 10, first: float = 0.1,
          last: float | None = None) -> dict[str, Any]:
    return {"request_id": "chatcmpl-" + rid, "endpoint": "chat", "stream": True, "prompt_tokens": 5,
            "max_tokens": 100, "target_tokens": 100, "arrival": 0.0, "scheduled": 0.05, "first_token": first,
            "last_token": last if last is not None else first + 0.01 * (generated - 1), "freed": freed,
            "generated_tokens": generated, "finish_reason": reason}


def _run() -> tuple[list[StreamRecord], LedgerSnapshot]:
    records = [
        rec("a", stop=1.0), rec("b", stop=1.0),  # close: freed 12 ms after Stop
        rec("h", mode="hold", stop=1.0),  # held: freed after 1 s, a zombie
        rec("n", mode="none", stop=1.0),  # read on: never aborted
        rec("u", stop=None, mode="close"),  # ended before its Stop: not stopped
        rec("x", stop=None, error=INTERRUPTED),  # the run's end cut it: not stopped either
    ]
    ledger = LedgerSnapshot.from_json({"now": 3.0, "requests": [
        entry("a", 1.012, "abort"), entry("b", 1.012, "abort"), entry("h", 2.0, "abort", generated=40),
        entry("n", 2.5, "length", generated=60), entry("u", 0.5, "length"), entry("x", 3.0, "abort")]})
    return records, ledger


def test_a_stream_nobody_stopped_is_filed_once_as_not_stopped() -> None:
    records, ledger = _run()
    cells = {(c.stack, c.close_mode): c.figures for c in account(records, ledger, None, 3.0, cell_of=by_outcome).cells}
    assert set(cells) == {("requests", m) for m in ("close", "hold", "none", NOT_STOPPED)}
    assert cells[("requests", "close")].streams.value == cells[("requests", "close")].stopped.value == 2
    assert cells[("requests", NOT_STOPPED)].streams.value == 2
    assert cells[("requests", NOT_STOPPED)].interrupted.value == 1
    # the default grouping is the planned close mode, as before
    plan = {(c.stack, c.close_mode) for c in account(records, ledger, None, 3.0).cells}
    assert plan == {("requests", m) for m in ("close", "hold", "none")}


def test_the_verdict_names_honoured_late_and_never_cells_with_their_sources() -> None:
    records, ledger = _run()
    acc = account(records, ledger, None, 3.0, cell_of=by_outcome)
    summary = run_summary(records, acc, None, ledger, None, 3.0, planned_stacks=("requests", "openai"))
    assert summary.step.value == pytest.approx(0.01)  # the ledger's inter-token time
    v = verdict(acc, summary, None, 3.0, {"ttft": (2, 6), "itl": (0, 50)})
    assert v.step_bound_s == pytest.approx(step_bound(0.01, 0.1)) == pytest.approx(0.015)
    outcomes = {c.close_mode: c.outcome for c in v.cells}
    assert outcomes == {"close": "honoured", "hold": "late", "none": "never"}  # no row for "not stopped"
    first = v.sentences[0]
    assert first.startswith("Stop freed the server's slot within one engine step (≤ 15 ms Stop → slot freed) for "
                            "requests close; late for requests hold (p99 1,000 ms); never for requests none")
    assert first.endswith("[simulator ledger].")
    assert v.sentences[1].startswith("2 zombies (stopped streams still generating) held ")  # hold and none
    assert any("2 of 6 TTFTs" in c for c in v.caveats)
    assert any(c.startswith("1 of 2 client stacks sent no stream: openai") for c in v.caveats)
    assert Verdict.from_json(v.to_json()) == v


def test_without_server_truth_the_verdict_says_unknown_not_zero() -> None:
    records, _ledger = _run()
    acc = account(records, None, None, 3.0, cell_of=by_outcome)
    summary = run_summary(records, acc, None, None, None, 3.0)
    assert summary.step.value is None and summary.output_rate.value is None
    v = verdict(acc, summary, None, 3.0)
    assert v.step_bound_s == 0.1 and {c.outcome for c in v.cells} == {"unknown"}
    assert "unknown for" in v.sentences[0] and len(v.sentences) == 1  # no zombie or saving sentence to make up


def test_the_summary_block_reads_the_clients_timings() -> None:
    records, ledger = _run()
    acc = account(records, ledger, None, 3.0, cell_of=by_outcome)
    s = run_summary(records, acc, None, ledger, None, 2.0)
    assert s.requests.value == 6 and s.completed.value == 1 and s.request_rate.value == 3.0
    ttft = s.ttft.value
    assert isinstance(ttft, Distribution) and ttft.count == 6 and ttft.p50 == pytest.approx(0.1)
    tpot, itl = s.tpot.value, s.itl.value
    assert isinstance(tpot, Distribution) and tpot.p50 == pytest.approx(0.01)
    assert isinstance(itl, Distribution) and itl.count == 6 * 9
    assert s.stacks == ("requests",) and len(s.ttft_samples_s) == 6
    assert Summary.from_json(s.to_json()) == s


def test_over_time_counts_zombies_and_tokens_per_bin() -> None:
    records, ledger = _run()
    table = over_time(records, ledger, 0.0, 3.0, 0.1, width_s=0.5)
    assert table is not None and [r[0] for r in table.rows] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    zombies = table.column("zombies")
    assert zombies == [0, 0, 2, 2, 1, 0]  # hold and none from Stop + grace; hold freed at 2.0, none at 2.5
    assert sum(table.column("delivered_tok_s")) * 0.5 == pytest.approx(sum(r.tokens_read for r in records))
    assert sum(table.column("generated_tok_s")) * 0.5 == pytest.approx(sum(e.generated_tokens for e in ledger.served))
    assert over_time([], ledger, 0.0, 3.0, 0.1) is None
    assert bin_width(10) == 0.25 and bin_width(3600) == 15.0


def test_the_bootstrap_is_seeded_and_brackets_the_quantile() -> None:
    samples = [k / 100 for k in range(100)]
    iv = bootstrap_interval(samples, 0.5)
    assert iv is not None and iv[0] < 0.495 < iv[1] and iv == bootstrap_interval(samples, 0.5)
    assert bootstrap_interval([1.0], 0.5) is None
    d = bootstrap_difference(samples, [s + 1 for s in samples], 0.95)
    assert d is not None and 0.8 < d[0] <= 1.0 <= d[1] < 1.2
    assert (few_requests(0.5), few_requests(0.9), few_requests(0.95), few_requests(0.99)) == (10, 50, 100, 500)


def test_a_capacity_search_names_its_thin_steps_and_its_knee_rates() -> None:
    steps = (SearchStep(2, 40, 0.1, True, (0.05, 0.2), 1.0, 60.0), SearchStep(4, 120, 0.8, True, None, 2.0, 110.0),
             SearchStep(6, 130, 2.5, False, None, 2.1, 115.0))
    search = CapacitySearch("queue_wait p95 < 2 s", 0.95, steps, 4, "holds 4 users")
    assert search.knee == steps[1] and search.thin_steps() == [steps[0]]
    assert CapacitySearch.from_json(search.to_json()) == search
    records, ledger = _run()
    acc = account(records, ledger, None, 3.0, cell_of=by_outcome)
    v = verdict(acc, run_summary(records, acc, None, ledger, None, 3.0), None, 3.0, search=search)
    assert ("Capacity: 4 users within queue_wait p95 < 2 s (2.00 req/s, 110.0 output tok/s at the knee); it broke "
            "at 6 users (2.500 s) [simulator ledger].") in v.sentences
    assert any("1 capacity step judged on fewer than 100 requests (2 users: 40)" in c for c in v.caveats)
