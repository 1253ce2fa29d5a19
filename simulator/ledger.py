"""The simulator's per-request truth: what the server really did with each request, and when.

stopstorm measures every stop against this ledger, never against what a client believes. Times are
`time.monotonic()` seconds: CLOCK_MONOTONIC is one system-wide clock on Linux, so a client on the same host
can compare its own marks with these directly; `epoch_offset` converts them to Unix time for anyone else.

Schema 2 added `connection_lost` and `close_missed`: a close the HTTP front saw is not always one the server
acted on. vLLM acts on a close by aborting the request; when the request finishes first (the close came, or
was acted on, after its last token), the stream runs to its end and nothing is aborted. `connection_lost` is
when the front saw the close, `disconnect_seen` when the server acted on it (the abort), and `close_missed`
marks a request whose connection closed before its response was complete but which ran to its end anyway
(`disconnect_seen` None, `finish_reason` "length" or "stop"). See docs/guides/missed-closes.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["LEDGER_SCHEMA_VERSION", "Ledger", "LedgerEntry"]

LEDGER_SCHEMA_VERSION = 2


@dataclass(slots=True)
class LedgerEntry:
    """One request's life on the server. A mark is None until it happens (never 0 as 'unknown')."""

    request_id: str
    endpoint: str  # "chat" or "completions"
    stream: bool
    prompt_tokens: int
    max_tokens: int
    # Tokens this request would generate if nobody stopped it (EOS draw or max_tokens): the counterfactual.
    target_tokens: int
    arrival: float
    scheduled: float | None = None  # admitted to a running slot (queue wait ends)
    first_token: float | None = None
    last_token: float | None = None
    # The HTTP front saw the client's connection close (uvicorn's http.disconnect) before the response was done.
    connection_lost: float | None = None
    disconnect_seen: float | None = None  # the server acted on the close: asked the engine to abort
    freed: float | None = None  # left the engine: slot freed if it ran, removed from the queue if not
    generated_tokens: int = 0  # as counted in vllm:generation_tokens_total
    generated_at_disconnect: int | None = None  # generated_tokens when the close was seen
    sent_tokens: int = 0  # tokens written to the socket (a stalled reader's may sit in buffers)
    # When the chunk with the first token was handed to the socket (the client's TTFT truth: first_token is
    # when the engine made it); and, only under --ledger-send-times, [time, sent_tokens] for every chunk. The
    # clock is read just before each write, so a send time never follows the client's read of that chunk.
    first_sent: float | None = None
    send_times: list[list[float]] | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while in flight
    status_code: int = 200
    error: str | None = None  # a failure the server itself reported (e.g. a mid-stream error event)
    fault: str | None = None  # the fault injected into this request (simulator/faults.py spec), if any
    # The connection closed before the response was complete, yet the request ran to its end unaborted: the
    # server acted on the close too late (--disconnect-delay-ms). Its later chunks went to a closed connection.
    close_missed: bool = False

    @property
    def queue_wait(self) -> float | None:
        if self.scheduled is None:
            return None if self.freed is None else self.freed - self.arrival
        return self.scheduled - self.arrival

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["queue_wait"] = self.queue_wait
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LedgerEntry:
        """An entry as `to_json` wrote it (over HTTP, in a saved report); keys it does not know are skipped,
        so a reader keeps working against a newer simulator that adds some."""
        return cls(**{name: data[name] for name in _ENTRY_FIELDS if name in data})


@dataclass(slots=True)
class Ledger:
    """All requests since start or the last reset, by request id, in arrival order."""

    entries: dict[str, LedgerEntry] = field(default_factory=dict)
    # Monotonic → Unix time, taken once so every converted mark shares one offset.
    epoch_offset: float = field(default_factory=lambda: time.time() - time.monotonic())

    def add(self, entry: LedgerEntry) -> None:
        self.entries[entry.request_id] = entry

    def get(self, request_id: str) -> LedgerEntry | None:
        return self.entries.get(request_id)

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def reset(self) -> int:
        """Forget finished requests (in-flight ones stay, so their truth is not cut in half); returns how many."""
        done = [rid for rid, e in self.entries.items() if e.freed is not None]
        for rid in done:
            del self.entries[rid]
        return len(done)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": LEDGER_SCHEMA_VERSION,
            "clock": "monotonic",
            "epoch_offset": self.epoch_offset,
            "now": time.monotonic(),
            "requests": [e.to_json() for e in self.entries.values()],
        }


_ENTRY_FIELDS = tuple(f.name for f in fields(LedgerEntry))
