"""The one record of a stream, as its client saw it: raw marks, with every figure derived from them.

Every client stack fills the same `StreamRecord`; reports and the ledger join it with server truth by request
id. Times are `time.monotonic()` seconds (CLOCK_MONOTONIC, one clock for the whole host on Linux, so marks
compare directly with the simulator's ledger), plus one wall-clock start for humans. A derived figure is
None when its marks are missing, never 0.
"""

from __future__ import annotations

from array import array
from collections.abc import MutableSequence
from dataclasses import asdict, dataclass, field, fields
from itertools import pairwise
from typing import Any

__all__ = ["INTERRUPTED", "RECORD_SCHEMA_VERSION", "StreamRecord"]

RECORD_SCHEMA_VERSION = 1
# The `error` of a stream the run's own end (run time, Stop, a signal) cut short: recorded, not the server's fault.
INTERRUPTED = "interrupted: the run ended mid-stream"


@dataclass(slots=True)
class StreamRecord:
    """One streamed completion from send to close."""

    stack: str  # client stack: requests, httpx, httpx-async, openai, openai-async, fasthttp
    close_mode: str  # what the client does at Stop: close, drop, hold or none
    endpoint: str  # chat or completions
    request_id: str  # the X-Request-Id we sent
    stop_plan: str  # when the user was to press Stop: "never", "tokens:37", "seconds:1.25", "first-token"
    wall_start: float  # time.time() when sent
    sent: float  # when the user sent it: stopstorm began the request (before the library's pool and connect)
    # Just before the request's last write began, where the stack lets us see it (the sync stacks over plain HTTP
    # on Linux: users/socket_stamps.py; the async stacks at their network stream's write, TLS too:
    # users/httpcore_stamps.py); TTFT counts from it when known.
    written: float | None = None
    server_id: str | None = None  # the id the server put in its chunks (chatcmpl-… / cmpl-…)
    headers: float | None = None
    first_token: float | None = None
    # Arrival of each chunk that carried tokens, and the running token count after it: lists while the stream
    # runs, packed arrays once it is collected (`compact`).
    chunk_times: MutableSequence[float] = field(default_factory=list)
    chunk_tokens: MutableSequence[int] = field(default_factory=list)
    stop: float | None = None  # the user pressed Stop
    tokens_at_stop: int | None = None
    closed: float | None = None  # close (or the end of a hold) returned
    ended: float | None = None  # the stream ended by itself: [DONE], or the server closed it
    tokens: int = 0  # tokens received: from usage when the server sends it, else chunks with text
    usage_tokens: int | None = None  # last completion_tokens the server reported
    prompt_tokens: int | None = None
    finish_reason: str | None = None  # as the server sent it (never present for our own disconnect)
    done: bool = False  # saw data: [DONE]
    status: int | None = None  # HTTP status
    error: str | None = None  # why the stream failed, in words; None if it did not
    # Token chunks whose text held U+FFFD: invalid UTF-8 the client decoded with replacement, as SSE does (or the
    # character itself, sent as such: a text-decoding client cannot tell them apart).
    replaced_chunks: int = 0
    # Which clock stamped headers, first_token and chunk_times: "kernel" (the kernel's receive time of their
    # bytes, SO_TIMESTAMPNS) or "read" (the process's clock when they were read, after any wait for the hub or the
    # event loop: by the parser, or by the async stacks' network stream before the library parses them).
    stamp_clock: str = "read"

    # -- derived ---------------------------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        return self.stop is not None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        """From the request's write where the stack shows it, else from the send, to the first token's arrival."""
        if self.first_token is None:
            return None
        return self.first_token - (self.sent if self.written is None else self.written)

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive token-carrying chunks (a merged chunk counts once)."""
        return [b - a for a, b in pairwise(self.chunk_times)]

    @property
    def duration(self) -> float | None:
        """Send until the user stopped reading: Stop, or the end of the stream, or the failure."""
        end = self.stop if self.stop is not None else self.ended
        return None if end is None else end - self.sent

    @property
    def tokens_read(self) -> int:
        """Tokens the user saw: up to Stop (a `none` close reads on, but nobody looks)."""
        return self.tokens if self.tokens_at_stop is None else self.tokens_at_stop

    def compact(self) -> None:
        """Pack the per-chunk marks into arrays (8 bytes a mark instead of a Python float or int and its list
        slot, ~32-36): a run keeps every record for its report, and these marks are most of a record."""
        if not isinstance(self.chunk_times, array):
            self.chunk_times = array("d", self.chunk_times)
        if not isinstance(self.chunk_tokens, array):
            self.chunk_tokens = array("q", self.chunk_tokens)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["chunk_times"] = list(self.chunk_times)
        out["chunk_tokens"] = list(self.chunk_tokens)
        out["ttft"] = self.ttft
        out["duration"] = self.duration
        out["tokens_read"] = self.tokens_read
        return out

    # -- the wire: a worker ships its records to the master (metrics/plugin/distributed.py) -------------------------

    def to_wire(self) -> dict[str, Any]:
        """The raw marks only, as a msgpack-friendly dict (str, int, float, None, lists): what a Locust
        worker sends its master. Derived figures are not sent; the master derives them again."""
        out = {f.name: getattr(self, f.name) for f in _FIELDS}
        out["chunk_times"] = list(self.chunk_times)
        out["chunk_tokens"] = list(self.chunk_tokens)
        return out

    @classmethod
    def from_wire(cls, data: dict[str, Any], shift: float = 0.0) -> StreamRecord:
        """The record `to_wire` sent; `shift` seconds are added to every monotonic mark, to re-base a
        record from a worker on another host onto this host's monotonic clock (0 on one host)."""
        record = cls(**{f.name: data[f.name] for f in _FIELDS if f.name in data})
        if shift:
            for name in _MONOTONIC:
                value = getattr(record, name)
                if value is not None:
                    setattr(record, name, value + shift)
            record.chunk_times = [t + shift for t in record.chunk_times]
        return record


_FIELDS = fields(StreamRecord)
# The marks on the monotonic clock (chunk_times too); wall_start is wall-clock and never shifted.
_MONOTONIC = ("sent", "written", "headers", "first_token", "stop", "closed", "ended")
