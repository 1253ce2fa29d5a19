"""Single streams through each client stack's transport, outside Locust's users: what the stack, accounting and
real-vLLM tests share (users/single.py, the path the probe runs its streams through too)."""

from __future__ import annotations

import argparse
from importlib.metadata import version
from typing import Any

from stopstorm.metrics.record import StreamRecord
from stopstorm.users.options import RunSettings, build_settings
from stopstorm.users.single import SingleStreams

__all__ = ["CLOSE_SIM_ARGS", "HOLD_S", "LONG", "OPTIONS", "STOP_AT", "Streams", "check_abort_at_next_step",
           "check_no_waste", "engine_lag", "ledger_id", "make_settings", "unread_reason", "versions"]

STOP_AT = 20  # tokens read before Stop
LONG = 2000  # max_tokens (with ignore_eos) no stream can reach while we watch it: 10 s of 5 ms steps
HOLD_S = 0.6

# The prompt-close tests (close, and drops that close at once) run at the simulator's default step, 15 ms: the
# README's claims ("aborted within one 15 ms step"; close wastes 0 tokens) are made at it. A close wastes 0 only
# if the server sees it before the step after the user's last token ends, so the client's own read → Stop →
# close → seen path must fit in one step: at 5 ms steps on this loaded 2-core box it did not always (1 stream
# in 15 for httpx and httpx-async made one token more, Stop → seen up to 5.8 ms); at 15 ms it took at most
# 3.6 ms (7.6 ms under two CPU hogs). Every chunk's send time is kept, to tell a client that fell behind.
CLOSE_SIM_ARGS = ("--step-base-ms", "15", "--max-num-seqs", "16", "--ledger-send-times")
# A token's chunk goes out a moment after its step ends (the writer task's turn on the server's loop).
WRITER_TOL_S = 0.003

OPTIONS: dict[str, Any] = {
    "endpoint": "chat", "model": "llm", "prompts": "", "max_tokens": LONG, "temperature": 0.0, "ignore_eos": True,
    "no_usage": False, "no_continuous_usage": False, "api_key": "", "stop_probability": 1.0,
    "stop_at": f"tokens:fixed:{STOP_AT}", "close_mix": "close:1", "hold_seconds": HOLD_S, "think_time": 0.0,
    "read_timeout": 30.0,
}


def versions() -> str:
    return ", ".join(f"{d} {version(d)}" for d in ("requests", "httpx", "geventhttpclient", "openai", "httpx2"))


def make_settings(host: str, **options: Any) -> RunSettings:
    """Settings as Locust's parsed options would give them (names from users/options.py)."""
    return build_settings(argparse.Namespace(**{**OPTIONS, **options}), host)


def engine_lag(stats: dict[str, Any]) -> float:
    """Seconds the engine's steps have ended late in all, by its own clock (`GET /stopstorm/stats`)."""
    return float(stats["engine"]["lag_s"])


def check_abort_at_next_step(entry: dict[str, Any], step_s: float, lag_s: float) -> None:
    """The server acted on a close at the first step boundary after it saw it, judged on its ledger's stamps
    alone (no client clock, no disconnect tolerance):

    - not one token counted after it saw the close (vLLM drops the in-flight token of an aborted request);
    - the slot freed within one step of the last token it counted, and so of seeing the close: one modelled
      step (`step_s`, every slot running) plus `lag_s`, what the engine's steps ran late in all while the
      stream ran (its own measure, so a loaded host stretches the bound by exactly its lag). An abort deferred
      one step either counts that step's token (sent to a closed socket) or, dropping it, frees the slot two
      steps after the last token, which fails unless the host's lag alone made up a whole step.
    """
    seen, freed, last = entry["disconnect_seen"], entry["freed"], entry["last_token"]
    assert entry["finish_reason"] == "abort", entry
    assert seen is not None and freed is not None and last is not None, entry
    assert entry["generated_tokens"] == entry["generated_at_disconnect"], (
        f"{entry['generated_tokens'] - entry['generated_at_disconnect']} token(s) generated after the server saw "
        f"the close: {dict((k, v) for k, v in entry.items() if k != 'send_times')}")
    bound = step_s + lag_s + 1e-6  # freed − last token is the step's modelled duration plus its lag, exactly
    assert freed - last <= bound, (
        f"slot freed {(freed - last) * 1e3:.2f} ms after the last token counted, {(freed - seen) * 1e3:.2f} ms "
        f"after the close was seen: more than one step ({step_s * 1e3:.2f} ms + {lag_s * 1e3:.2f} ms of lag)")
    assert freed - seen <= bound


def unread_reason(entry: dict[str, Any], record: StreamRecord, step_s: float) -> str | None:
    """Why a prompt close may have let the server make a token the user did not read, from the ledger (run
    with --ledger-send-times): the server saw the close more than a step (less the writer's moment) after it
    sent the token the user stopped at, so a step could end first (the client fell behind the server, or its
    close path was slow). None when it saw the close in time: then not one unread token may exist."""
    seen, times = entry["disconnect_seen"], entry["send_times"]
    assert seen is not None and times, "run the simulator with --ledger-send-times"
    sent_read = next(t for t, n in times if n >= record.tokens_read)
    if seen - sent_read <= step_s - WRITER_TOL_S:
        return None
    return (f"the server saw the close {(seen - sent_read) * 1e3:.2f} ms after sending token "
            f"{record.tokens_read}, more than a step ({step_s * 1e3:.2f} ms)")


def check_no_waste(entry: dict[str, Any], record: StreamRecord, step_s: float, read: int = STOP_AT) -> int:
    """A prompt close generates no token the user did not read (README; docs/guides/probe.md): the stream
    stopped at the `read` tokens the test fixed, and the server generated exactly those. The one honest
    exception (`unread_reason`): a client that let a step end before the server saw its close, whose tokens
    were made before it (check_abort_at_next_step) and were in flight to it. Returns the unread tokens."""
    stop, seen = record.stop, entry["disconnect_seen"]
    assert stop is not None and seen is not None
    assert record.tokens_read == read, record
    unread = entry["generated_tokens"] - read
    reason = unread_reason(entry, record, step_s)
    assert unread == 0 or (unread > 0 and reason is not None), (
        f"{unread} token(s) nobody read though the server saw the close in time: last token counted "
        f"{(entry['last_token'] - stop) * 1e3:+.2f} ms from Stop, close seen {(seen - stop) * 1e3:+.2f} ms, slot "
        f"freed {(entry['freed'] - stop) * 1e3:+.2f} ms")
    return unread


def ledger_id(record: StreamRecord) -> str:
    return ("chatcmpl-" if record.endpoint == "chat" else "cmpl-") + record.request_id


class Streams(SingleStreams):
    """Single streams through each stack's transport (one per stack per host), outside Locust's users: the
    users' own path (users/single.py), which the probe runs its streams through too."""
