"""--fail-on thresholds: parsed before the run (a typo refused naming what exists), judged on the final figures,
held or broken with the value, and broken when the figure cannot be checked."""

from __future__ import annotations

import pytest

from stopstorm.metrics.analysis.accounting import account
from stopstorm.metrics.analysis.thresholds import (
    EXIT_THRESHOLD_BROKEN,
    evaluate,
    parse_threshold,
    parse_thresholds,
    result_lines,
)
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.ledger import LedgerSnapshot


def rec(rid: str, mode: str, stack: str = "requests", *, stop: float | None = 1.0, tokens: int = 10,
        error: str | None = None) -> StreamRecord:
    return StreamRecord(stack=stack, close_mode=mode, endpoint="chat", request_id=rid, stop_plan="tokens:10",
                        wall_start=0.0, sent=0.0, headers=0.01, first_token=0.05, stop=stop,
                        tokens_at_stop=tokens if stop is not None else None, tokens=tokens, error=error)


def entry(rid: str, *, freed: float | None, generated: int, reason: str | None) -> dict[str, object]:
    return {"request_id": "chatcmpl-" + rid, "endpoint": "chat", "stream": True, "prompt_tokens": 10,
            "max_tokens": 100, "target_tokens": 100, "arrival": 0.0, "scheduled": 0.02, "first_token": 0.05,
            "last_token": 1.0, "disconnect_seen": None, "freed": freed, "generated_tokens": generated,
            "finish_reason": reason}


@pytest.fixture(scope="module")
def accounting():
    """A `close` abort freed 2 ms after Stop, a `hold` zombie freed 3 s after, and a failed stream read to the end."""
    records = [rec("a", "close"), rec("b", "hold", "openai"), rec("c", "none", stop=None, error="HTTP 500: x")]
    ledger = LedgerSnapshot.from_json({"now": 10.0, "requests": [
        entry("a", freed=1.002, generated=12, reason="abort"),
        entry("b", freed=4.0, generated=100, reason="length"),
        entry("c", freed=2.0, generated=10, reason="length")]})
    return account(records, ledger, None, 10.0)


def test_a_threshold_that_is_true_breaks_and_one_that_is_false_holds(accounting):
    results = evaluate(parse_thresholds(["zombie_slot_seconds>0", "abort_latency.p99>50ms", "failed_ratio>0.5",
                                         "wasted_tokens_ratio>0.01", "ttft.p99 > 1", "streams>=3"]), accounting)
    by = {r.expr: r for r in results}
    assert not by["zombie_slot_seconds>0"].held and by["zombie_slot_seconds>0"].value == pytest.approx(3.0)
    assert by["abort_latency.p99>50ms"].held and by["abort_latency.p99>50ms"].value == pytest.approx(0.002)
    assert by["failed_ratio>0.5"].held and by["failed_ratio>0.5"].value == pytest.approx(1 / 3)
    wasted = by["wasted_tokens_ratio>0.01"]  # 2 + 90 wasted of 122 generated (30 read)
    assert not wasted.held and wasted.value == pytest.approx(92 / 122)
    assert by["ttft.p99>1"].held and by["ttft.p99>1"].value == pytest.approx(0.05)
    assert not by["streams>=3"].held
    text = result_lines(results)
    assert text.splitlines()[0] == f"stopstorm thresholds: 3 of 6 broken (exit status {EXIT_THRESHOLD_BROKEN})"
    assert "  BROKEN  zombie_slot_seconds>0  (3" in text and "  held    failed_ratio>0.5  (0.333333)" in text


def test_cells_and_wildcards(accounting):
    results = evaluate(parse_thresholds("zombies[openai/*]>0, zombies[requests/*]>0, zombies[*/*]>0, "
                                        "zombies[fasthttp/close]>0"), accounting)
    openai, requests, every, missing = results
    assert not openai.held and openai.value == 1
    assert requests.held and requests.value == 0
    assert not every.held and "broken in openai/hold" in (every.note or "")
    assert not missing.held and missing.value is None and "no such cell" in (missing.note or "")


def test_a_figure_that_cannot_be_checked_breaks():
    no_ledger = account([rec("a", "close")], None, None, 5.0)  # no server truth: zombies are unavailable
    (zombies, capacity) = evaluate(parse_thresholds(["zombies>0", "capacity.ttft.p99>1"]), no_ledger)
    assert not zombies.held and zombies.value is None and "cannot be checked" in (zombies.note or "")
    assert not capacity.held and "no capacity section" in (capacity.note or "")


def test_run_figures_and_units(accounting):
    t = parse_threshold("run.unmatched_requests>0")
    assert (t.section, t.name) == ("run", "unmatched_requests")
    assert parse_threshold("unjoined_streams>0").section == "run"  # a bare run figure's name
    assert parse_threshold("queue_wait.p95>2s").limit == 2.0
    assert parse_threshold("abort_latency.max<=250ms").limit == pytest.approx(0.25)
    (held,) = evaluate([t], accounting)
    assert held.held and held.value == 0


@pytest.mark.parametrize(("text", "words"), [
    ("zombie_slot_seconds", "expected FIGURE OP NUMBER"),
    ("zombie_seconds>0", "no figure 'zombie_seconds'; the figures are:"),
    ("abort_latency>0.05", "abort_latency is a distribution: name one of its statistics, e.g. abort_latency.p99"),
    ("abort_latency.p42>0.05", "is a distribution"),
    ("zombies.p99>0", "zombies is a number, not a distribution: drop .p99"),
    ("zombies>many", "'many' is not a number"),
    ("zombies>1ms", "zombies is not in seconds"),
    ("failures>0", "failures is not a number"),
    ("run.zombies>0", "no run figure 'zombies'"),
    ("duration[requests/close]>0", "[STACK/MODE] names a cell"),
    ("gpu.joules>0", "no gpu figure 'joules'"),
    ("zombies>nan", "'nan' is not a number"),
])
def test_a_bad_expression_is_refused_naming_the_option(text, words):
    with pytest.raises(ValueError) as err:
        parse_threshold(text)
    assert str(err.value).startswith(f"--fail-on {text!r}: ") and words in str(err.value), str(err.value)
