"""A closed stream runs on when the server acts on the close only after the request has finished.

Why these tests: against vLLM a stream the client closed early is not aborted when the request finishes before
the server acts on the close; the ledger must then say so (`connection_lost` set, `disconnect_seen` None,
`finish_reason` length, `close_missed`), and whether it happens must follow the stop's timing and the request's
speed, not a loss rate (docs/guides/missed-closes.md). The default simulator acts at once, as vLLM measured
here does; `--disconnect-delay-ms` is a server that acts late.
"""

from __future__ import annotations

import time

from conftest import FAST, SCHED_TOL_S, RawStream, SimHandle, chat_body

from stopstorm.metrics.analysis.accounting import account
from stopstorm.metrics.analysis.closes import ABORTED, RAN_ON, classify_ledger, classify_log
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.ledger import LedgerSnapshot
from stopstorm.metrics.truth.vllm_log import LogIndex

CHAT = "/v1/chat/completions"
DELAY_MS = 100
LATE = (*FAST, "--disconnect-delay-ms", str(DELAY_MS))  # 5 ms steps, acts on a close 100 ms late
LATE_SLOW = ("--step-base-ms", "20", "--disconnect-delay-ms", str(DELAY_MS))  # the same server, 4x slower


def _close_at_first_token(sim: SimHandle, rid: str, max_tokens: int) -> float:
    """Stream `max_tokens` (ignore_eos), read up to the first content chunk, close; the time just before the close."""
    with RawStream(sim, CHAT, chat_body(max_tokens, ignore_eos=True), rid) as s:
        s.read_events(2)  # the role chunk, then the first token
        return s.close()[0]


def _log_lines(sim: SimHandle, rid: str) -> list[str]:
    return [line for line in sim.log_text().splitlines() if f"chatcmpl-{rid}" in line]


def test_default_server_acts_on_a_close_at_once(sim_pool):
    sim = sim_pool.fresh(*FAST)
    t_close = _close_at_first_token(sim, "mc-now", 200)
    e = sim.wait_entry("chatcmpl-mc-now")
    assert e["finish_reason"] == "abort" and not e["close_missed"]
    assert e["connection_lost"] is not None and e["disconnect_seen"] is not None
    # How soon after the close (DISCONNECT_TOL_S) is test_simulator_http's; here: it acts when it sees it.
    assert t_close <= e["connection_lost"] <= e["disconnect_seen"] <= e["connection_lost"] + SCHED_TOL_S


def test_a_close_after_the_last_token_aborts_nothing(sim_pool):
    """What vLLM's log shows as "ran on" when the close comes after the end: Added, no abort, every token."""
    sim = sim_pool.fresh(*FAST)
    with RawStream(sim, CHAT, chat_body(4, ignore_eos=True), "mc-after") as s:
        s.read_headers()
        e = sim.wait_entry("chatcmpl-mc-after")  # finished in the engine; we read nothing yet
        time.sleep(SCHED_TOL_S)
        s.close()
    time.sleep(5 * sim.config.step_base_s)
    e = sim.entry("chatcmpl-mc-after")
    assert e is not None and e["finish_reason"] == "length" and e["generated_tokens"] == 4
    assert e["disconnect_seen"] is None and e["connection_lost"] is None and not e["close_missed"]
    lines = _log_lines(sim, "mc-after")
    assert any("Added request" in ln for ln in lines) and not any("borted" in ln for ln in lines)


def test_a_late_server_misses_the_close_of_a_short_stream(sim_pool):
    sim = sim_pool.fresh(*LATE)
    t_close = _close_at_first_token(sim, "mc-short", 8)  # 7 more tokens: ~35 ms, well inside the 100 ms
    e = sim.wait_entry("chatcmpl-mc-short")
    assert e["close_missed"] is True
    assert e["finish_reason"] == "length" and e["generated_tokens"] == 8
    assert e["disconnect_seen"] is None
    assert e["connection_lost"] is not None and e["connection_lost"] >= t_close
    assert e["freed"] < e["connection_lost"] + DELAY_MS / 1e3  # it ended before the server acted
    lines = _log_lines(sim, "mc-short")
    assert any("Added request" in ln for ln in lines) and not any("borted" in ln for ln in lines)


def test_a_late_server_still_aborts_a_long_stream_when_it_acts(sim_pool):
    sim = sim_pool.fresh(*LATE)
    _close_at_first_token(sim, "mc-long", 200)  # ~1 s of tokens left: the delay ends first
    e = sim.wait_entry("chatcmpl-mc-long")
    assert e["finish_reason"] == "abort" and not e["close_missed"]
    acted = e["disconnect_seen"] - e["connection_lost"]
    assert DELAY_MS / 1e3 <= acted <= DELAY_MS / 1e3 + SCHED_TOL_S
    # It generated on through the delay (a token a step; half of them, for a loaded box), then nothing more
    # after acting: the abort lands at the next step boundary.
    steps = DELAY_MS / 1e3 / sim.config.step_base_s
    assert e["generated_at_disconnect"] - 1 >= 0.5 * steps
    assert e["generated_tokens"] == e["generated_at_disconnect"] < 200
    assert e["freed"] <= e["disconnect_seen"] + sim.step_bound(1)


def test_whether_a_close_is_missed_follows_the_stream_speed(sim_pool):
    """The same stop (first token) and length on the same late server: missed at 5 ms a token (7 tokens left,
    35 ms < 100 ms), noticed at 20 ms a token (140 ms > 100 ms). Not a rate: the race of the stream's end with
    the server acting."""
    fast = sim_pool.fresh(*LATE)
    _close_at_first_token(fast, "mc-speed-fast", 8)
    slow = sim_pool.fresh(*LATE_SLOW)
    _close_at_first_token(slow, "mc-speed-slow", 8)
    e_fast = fast.wait_entry("chatcmpl-mc-speed-fast")
    e_slow = slow.wait_entry("chatcmpl-mc-speed-slow")
    assert e_fast["close_missed"] and e_fast["finish_reason"] == "length"
    assert not e_slow["close_missed"] and e_slow["finish_reason"] == "abort"
    assert e_slow["generated_tokens"] < 8


def test_whether_a_close_is_missed_follows_the_stop_timing(sim_pool):
    """A late server (300 ms) at 20 ms steps, 40 tokens: closed at the first token it is noticed (39 tokens =
    780 ms left), closed after 30 tokens it is missed (10 tokens = 200 ms left). The margins are wide on purpose:
    at 5 ms steps and 100 ms late (50 ms left) a test process behind by more than 50 ms under two CPU hogs read
    its 30th token after the stream's end, and its close came after the last token: not a missed close at all."""
    sim = sim_pool.fresh("--step-base-ms", "20", "--disconnect-delay-ms", "300")
    _close_at_first_token(sim, "mc-early", 40)
    with RawStream(sim, CHAT, chat_body(40, ignore_eos=True), "mc-late") as s:
        s.read_events(31)  # role chunk + 30 tokens
        s.close()
    early = sim.wait_entry("chatcmpl-mc-early")
    late = sim.wait_entry("chatcmpl-mc-late")
    assert early["finish_reason"] == "abort" and not early["close_missed"]
    assert late["connection_lost"] is not None and late["connection_lost"] < late["last_token"], late  # premise
    assert late["finish_reason"] == "length" and late["close_missed"] and late["generated_tokens"] == 40


# --- stopstorm's classifier against the race's own truth -------------------------------------------------------


def _record(rid: str, sent: float, stop: float, read: int) -> StreamRecord:
    return StreamRecord(stack="raw", close_mode="close", endpoint="chat", request_id=rid, stop_plan="first-token",
                        wall_start=0.0, sent=sent, stop=stop, tokens=read, tokens_at_stop=read, closed=stop)


def test_the_classifier_counts_the_races_missed_closes_as_the_ledger_and_the_log_show_them(sim_pool):
    """On a server acting 100 ms late: a short stream closed at its first token runs on (close_missed), a long
    one is aborted, and one closed only after its end runs on too (nothing was left to abort). stopstorm's
    classes from the ledger and from the simulator's vLLM-shaped log must agree per stream, and its ran-on
    count must be what the ledger marks."""
    sim = sim_pool.fresh(*LATE)
    records = []
    for rid, n in (("cl-short", 8), ("cl-long", 200), ("cl-short-2", 6)):
        with RawStream(sim, CHAT, chat_body(n, ignore_eos=True), rid) as s:
            sent = time.monotonic()
            s.read_events(2)
            records.append(_record(rid, sent, s.close()[0], 1))
    with RawStream(sim, CHAT, chat_body(4, ignore_eos=True), "cl-after") as s:
        sent = time.monotonic()
        s.read_headers()
        sim.wait_entry("chatcmpl-cl-after")  # done in the engine, nothing read
        records.append(_record("cl-after", sent, s.close()[0], 0))
    entries = sim.wait_idle()
    snap = LedgerSnapshot.from_json(sim.ledger())
    by_ledger = {o.record.request_id: o.outcome for o in classify_ledger(records, snap.by_id)}
    log = LogIndex.from_lines(sim.log_text().splitlines())
    by_log = {o.record.request_id: o.outcome for o in classify_log(records, log)}
    assert by_ledger == by_log == {"cl-short": RAN_ON, "cl-long": ABORTED, "cl-short-2": RAN_ON, "cl-after": RAN_ON}
    missed = [rid for rid, e in entries.items() if e["close_missed"]]
    assert sorted(missed) == ["chatcmpl-cl-short", "chatcmpl-cl-short-2"]  # the close came mid-stream
    assert entries["chatcmpl-cl-after"]["connection_lost"] is None  # this one came after the end
    acc = account(records, snap, None, 1.0)
    assert acc.overall.ran_on.value == 3 and acc.overall.ran_on_to_end.value == 3
    assert acc.overall.ran_on_tokens.value == (8 - 1) + (6 - 1) + 4
    assert acc.run.ran_on.value.startswith("3 of 4 stopped requests the engine registered kept generating")
    # without the ledger, the log alone says the same
    assert account(records, None, None, 1.0, log=log).overall.ran_on.value == 3
