"""The closed-stop classifier (metrics/analysis/closes.py): never reached / aborted / ran on, from the ledger or
vLLM's log, on the recorded early-stop fixtures and on synthetic ledgers.

Why: a stream whose close the server never acted on is a zombie that vLLM's counters do not show; the only
per-request trace is an `Added` line without an abort. The fixtures are real vLLM 0.32 logs of every outcome
(tests/fixtures/vllm-0.32-cpu-early-stop/README.txt says what a correct classifier must find), so these tests
hold the classifier to what vLLM really writes, with and without `--enable-log-outputs`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES_DIR

from stopstorm.metrics.analysis.accounting import account
from stopstorm.metrics.analysis.closes import (
    ABORTED,
    NEVER_REACHED,
    RAN_ON,
    READ_ON,
    classify_ledger,
    classify_log,
    close_figures,
    ran_on_finding,
)
from stopstorm.metrics.figures import CLIENT_ESTIMATE, LEDGER_SOURCE, LOG_SOURCE, UNAVAILABLE
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.report.console import format_accounting
from stopstorm.metrics.report.model import Report, RunMeta, report_from_json, report_to_json
from stopstorm.metrics.truth.ledger import LedgerSnapshot
from stopstorm.metrics.truth.vllm_log import LogIndex, parse_request_line

EARLY = FIXTURES_DIR / "vllm-0.32-cpu-early-stop"
# clients.json's verdicts in the classifier's words; "finished" (read to [DONE]) is not a stopped stream
VERDICT = {"never-registered": NEVER_REACHED, "aborted": ABORTED, "ran-on": RAN_ON}


def fixture(folder: str) -> tuple[list[StreamRecord], dict[str, str], LogIndex, dict[str, Any]]:
    """The folder's clients as StreamRecords (Stop: when the client closed; a client that read nothing and
    closed late stopped reading at its send), their verdicts, and the log indexed as it was saved."""
    doc = json.loads((EARLY / folder / "clients.json").read_text())
    records, verdicts = [], {}
    for c in doc["clients"]:
        early = c["closed_early"]
        stop = (c["sent_mono"] if c["stop"].startswith("send:1500") else c["closed_mono"]) if early else None
        records.append(StreamRecord(
            stack="raw", close_mode="close", endpoint="chat", request_id=c["request_id"], stop_plan=c["stop"],
            wall_start=0.0, sent=c["sent_mono"], stop=stop, tokens=c["tokens_read"],
            tokens_at_stop=c["tokens_read"] if early else None, closed=c["closed_mono"], done=c["read_to_done"]))
        verdicts[c["request_id"]] = c["verdict"]
    lines = (EARLY / folder / "server.log").read_text().splitlines()
    return records, verdicts, LogIndex.from_lines(lines, seen=0.0), doc


@pytest.mark.parametrize("folder", ["log-requests", "log-outputs"])
def test_the_log_classifier_finds_what_the_fixture_says(folder: str) -> None:
    records, verdicts, log, _ = fixture(folder)
    outcomes = classify_log(records, log)
    got = {o.record.request_id: o.outcome for o in outcomes}
    want = {rid: VERDICT[v] for rid, v in verdicts.items() if v != "finished"}
    assert got == want
    counts = {k: sum(1 for v in got.values() if v == k) for k in (NEVER_REACHED, ABORTED, RAN_ON)}
    assert counts == {NEVER_REACHED: 6, ABORTED: 18, RAN_ON: 4}  # the README's counts
    ran = [o for o in outcomes if o.outcome == RAN_ON]
    # 16 tokens each, all unread: max_tokens with ignore_eos from the Received line (exact for a stream run to
    # its end); the log says it ran to its end only with --enable-log-outputs
    assert all(o.generated == 16 and o.wasted == 16 for o in ran)
    assert all("ignore_eos" in o.generated_how for o in ran)
    if folder == "log-outputs":
        assert all(o.ran_to_end is True for o in ran)
        assert all(log.request("chatcmpl-" + o.record.request_id).deltas in (14, 15) for o in ran)  # type: ignore[union-attr]
    else:
        assert all(o.ran_to_end is None for o in ran)


@pytest.mark.parametrize("folder", ["log-requests", "log-outputs"])
def test_the_accounting_counts_ran_on_streams_as_zombies_and_says_so(folder: str) -> None:
    records, _, log, _ = fixture(folder)
    acc = account(records, None, None, 10.0, log=log)
    o = acc.overall
    assert (o.closed_stops.value, o.never_reached.value, o.ran_on.value) == (28, 6, 4)
    assert o.ran_on.source == LOG_SOURCE and o.ran_on_tokens.value == 64
    # Without a ledger the log's zombies fill the column (the saved log's lines all share one read time, so
    # no abort here counts as late: the zombies are the four ran-on streams)
    assert o.zombies.value == 4 and o.zombies.source == LOG_SOURCE
    finding = acc.run.ran_on.value
    assert isinstance(finding, str) and finding.startswith("4 of 22 stopped requests the engine registered kept "
                                                           "generating (18.2 %)")
    assert "6 of 28 closed before the engine registered them" in finding
    if folder == "log-outputs":
        assert o.ran_on_to_end.value == 4 and "4 confirmed run to the end" in finding
        assert o.ran_on_slot_seconds.source == LOG_SOURCE
    else:
        assert o.ran_on_to_end.source == UNAVAILABLE and "confirmed" not in finding
        # no (streaming complete) line and no token read, so no inter-token gap to estimate the slot time from
        assert o.ran_on_slot_seconds.source == UNAVAILABLE
    text = format_accounting(acc)
    assert f"ran on (missed closes): {finding}  [vLLM log]" in text
    assert "64 tokens unread" in text
    # the JSON carries every figure, and reads back the same
    report = Report(RunMeta(host="http://x"), acc)
    doc = report_to_json(report)
    assert doc["overall"]["figures"]["ran_on"]["value"] == 4
    assert doc["cells"][0]["figures"]["never_reached"]["value"] == 6
    assert doc["run"]["figures"]["ran_on"]["value"] == finding
    assert report_from_json(json.loads(json.dumps(doc))) == report


def test_request_lines_are_parsed() -> None:
    received = parse_request_line(
        "(APIServer pid=1) INFO 12-02 14:15:07 [request_logger.py:65] Received request chatcmpl-a: params: "
        "SamplingParams(n=1, ignore_eos=True, max_tokens=16, min_tokens=0), lora_request: None.", seen=3.0)
    assert received is not None and (received.kind, received.request_id) == ("received", "chatcmpl-a")
    assert (received.max_tokens, received.ignore_eos, received.seen) == (16, True, 3.0)
    delta = parse_request_line("INFO 12-02 14:15:07 [request_logger.py:108] Generated response chatcmpl-a "
                               "(streaming delta): output: ' x (streaming complete)', finish_reason: None")
    assert delta is not None and delta.kind == "delta"  # the output's own text does not fool it
    done = parse_request_line("INFO 12-02 14:15:07 [request_logger.py:108] Generated response chatcmpl-a "
                              "(streaming complete): output: 'x', finish_reason: streaming_complete")
    assert done is not None and done.kind == "complete"
    v09 = parse_request_line("INFO 11-24 18:24:21 [logger.py:43] Received request chatcmpl-b: prompt: 'hi', "
                             "params: SamplingParams(n=1, max_tokens=40, ignore_eos=False), prompt_token_ids: [1]")
    assert v09 is not None and (v09.max_tokens, v09.ignore_eos) == (40, False)
    assert parse_request_line("INFO 12-02 14:15:07 [async_llm.py:578] Added request chatcmpl-a-12345678.") is None


def test_a_live_follower_indexes_request_lines(tmp_path: Path) -> None:
    from stopstorm.metrics.truth.vllm_log import LogFollower

    path = tmp_path / "v.log"
    path.write_text("")
    follower = LogFollower(path, from_start=True)
    text = (EARLY / "log-outputs" / "server.log").read_text()
    path.write_text(text)
    follower.poll_once()
    assert follower.outputs_logged and follower.events > 0
    late = follower.request("chatcmpl-es-late-0")
    assert late is not None and late.max_tokens == 16 and late.complete is not None and late.deltas == 15
    # the live follower's fast path for output lines reads what the saved index reads, request by request
    saved = LogIndex.from_lines(text.splitlines())
    assert {k: (r.deltas, r.complete is not None, r.max_tokens, r.ignore_eos) for k, r in follower.requests.items()} \
        == {k: (r.deltas, r.complete is not None, r.max_tokens, r.ignore_eos) for k, r in saved.requests.items()}


# --- the ledger ----------------------------------------------------------------------------------------------


def rec(rid: str, mode: str = "close", *, stop: float | None = 1.0, read: int = 5) -> StreamRecord:
    return StreamRecord(stack="requests", close_mode=mode, endpoint="chat", request_id=rid, stop_plan="tokens:5",
                        wall_start=0.0, sent=0.0, stop=stop, tokens=read, tokens_at_stop=read if stop else None)


def entry(rid: str, reason: str | None, *, freed: float | None = 1.5, generated: int = 40,
          scheduled: float | None = 0.1, **extra: Any) -> dict[str, Any]:
    return {"request_id": "chatcmpl-" + rid, "endpoint": "chat", "stream": True, "prompt_tokens": 5,
            "max_tokens": 40, "target_tokens": 40, "arrival": 0.0, "scheduled": scheduled, "freed": freed,
            "generated_tokens": generated, "finish_reason": reason, **extra}


def test_the_ledger_classifier() -> None:
    records = [rec("ab"), rec("missed"), rec("after"), rec("gone"), rec("still"), rec("none", "none"),
               rec("full", stop=None)]
    snap = LedgerSnapshot.from_json({"now": 9.0, "requests": [
        entry("ab", "abort", freed=1.02, generated=6),
        entry("missed", "length", connection_lost=1.0, close_missed=True),  # the server acted too late
        entry("after", "length", freed=1.2),  # the close came after the end: nothing to abort
        entry("still", None, freed=None, generated=20),  # still running when the run ended
        entry("none", "length", freed=2.0), entry("full", "length")]})
    outcomes = {o.record.request_id: o for o in classify_ledger(records, snap.by_id, run_end=3.0)}
    assert "full" not in outcomes  # never stopped
    assert {k: o.outcome for k, o in outcomes.items()} == {
        "ab": ABORTED, "missed": RAN_ON, "after": RAN_ON, "gone": NEVER_REACHED, "still": RAN_ON, "none": READ_ON}
    assert outcomes["ab"].abort_latency == pytest.approx(0.02)
    assert outcomes["missed"].ran_to_end and outcomes["after"].ran_to_end and not outcomes["still"].ran_to_end
    assert outcomes["missed"].slot_seconds == pytest.approx(0.5)  # Stop → freed
    assert outcomes["still"].slot_seconds == pytest.approx(2.0)  # Stop → the run's end
    figs = close_figures(list(outcomes.values()), LEDGER_SOURCE)
    assert (figs.closed_stops.value, figs.never_reached.value, figs.ran_on.value, figs.ran_on_to_end.value) == \
        (5, 1, 3, 2)
    assert figs.ran_on_tokens.value == 35 + 35 + 15 and figs.ran_on_tokens.source == LEDGER_SOURCE
    assert figs.ran_on_slot_seconds.value == pytest.approx(0.5 + 0.2 + 2.0)
    assert ran_on_finding(list(outcomes.values()), LEDGER_SOURCE).value == (
        "3 of 4 stopped requests the engine registered kept generating (75.0 %): never aborted, 2 confirmed run to "
        "the end; 1 of 5 closed before the engine registered them")
    # With a ledger the ledger's zombies stand; the closed-stop figures sit beside them
    acc = account(records, snap, None, 3.0)
    assert acc.overall.ran_on.value == 3 and acc.overall.ran_on.source == LEDGER_SOURCE


def test_an_estimate_is_labelled() -> None:
    """No (streaming complete) line: the slot time is tokens left × the stream's own inter-token gap."""
    r = rec("e", stop=1.0, read=2)
    r.chunk_times, r.chunk_tokens = [0.5, 0.6], [1, 2]  # 0.1 s a token
    lines = ["INFO 12-02 14:15:07 [async_llm.py:578] Added request chatcmpl-e-0123abcd.",
             "INFO 12-02 14:15:07 [request_logger.py:65] Received request chatcmpl-e: params: "
             "SamplingParams(ignore_eos=True, max_tokens=12)"]
    acc = account([r], None, None, 2.0, log=LogIndex.from_lines(lines, seen=0.9))
    o = acc.overall
    assert o.ran_on.value == 1 and o.ran_on_tokens.value == 10
    assert o.ran_on_slot_seconds.value == pytest.approx(1.0) and o.ran_on_slot_seconds.source == CLIENT_ESTIMATE
    assert "inter-token gap" in (o.ran_on_slot_seconds.note or "")
    assert o.zombie_slot_seconds.source == CLIENT_ESTIMATE


def test_no_missed_close_is_said_as_such() -> None:
    records = [rec("a"), rec("b")]
    snap = LedgerSnapshot.from_json({"requests": [entry("a", "abort", freed=1.01), entry("b", "abort", freed=1.02)]})
    outcomes = classify_ledger(records, snap.by_id)
    assert ran_on_finding(outcomes, LEDGER_SOURCE).value == (
        "none of 2 stopped requests the engine registered kept generating: every one was aborted")
    assert ran_on_finding([], LOG_SOURCE).value == "no stopped stream closed"
