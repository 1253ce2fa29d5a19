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

A run of hours must not keep every request in memory, so the ledger also numbers its entries as they *settle*
(freed by the engine and its response done: nothing about it changes after that) and hands them out in that
order (`settled_after`, `GET /stopstorm/ledger/settled?after=N`). A reader that asks after N says it holds
every entry up to N; under `--forget-read-ledger` (the embedded simulator's setting) those are then dropped, so
the ledger holds only what is in flight and what nobody has read yet. Without it every entry stays, as before.
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

    # Settled entries' ids in settle order: the one at index i has number `_settled_base + i + 1`.
    _settled_ids: list[str] = field(default_factory=list)
    _settled_base: int = 0
    _unsettled: dict[str, None] = field(default_factory=dict)  # in the engine, or its response still going
    _responded: set[str] = field(default_factory=set)  # response done, not yet freed (an abort in the next step)
    forget_read: bool = False  # drop what a reader has acknowledged (--forget-read-ledger)
    forgotten: int = 0  # entries dropped so, in all

    def add(self, entry: LedgerEntry) -> None:
        self.entries[entry.request_id] = entry
        self._unsettled[entry.request_id] = None

    @property
    def settled_count(self) -> int:
        """The number of the latest entry to settle (0: none yet)."""
        return self._settled_base + len(self._settled_ids)

    def freed(self, entry: LedgerEntry) -> None:
        """The engine let the request go (its `freed` is set); it settles if its response is done too."""
        if entry.request_id in self._responded:
            self._responded.discard(entry.request_id)
            self._settle(entry)

    def responded(self, entry: LedgerEntry) -> None:
        """The request's response is done (sent, failed or its client gone); it settles once it is freed too."""
        if entry.freed is not None:
            self._settle(entry)
        else:
            self._responded.add(entry.request_id)

    def _settle(self, entry: LedgerEntry) -> None:
        if self._unsettled.pop(entry.request_id, 0) is None:  # once, and only while it is in the ledger
            self._settled_ids.append(entry.request_id)

    def settled_after(self, after: int, limit: int) -> tuple[list[LedgerEntry], int]:
        """Up to `limit` entries that settled after number `after`, in settle order, and the number of the last
        one given (`after` when none). Asking after N acknowledges 1..N: under `forget_read` they are dropped;
        a reader ahead of what has settled (it read another server, or this one before a restart) acknowledges
        nothing."""
        after = max(after, 0)
        if self.forget_read and self._settled_base < after <= self.settled_count:
            cut = after - self._settled_base
            for rid in self._settled_ids[:cut]:
                if self.entries.pop(rid, None) is not None:
                    self.forgotten += 1
            del self._settled_ids[:cut]
            self._settled_base += cut
        start = max(after - self._settled_base, 0)
        ids = self._settled_ids[start:start + limit]
        out = [e for rid in ids if (e := self.entries.get(rid)) is not None]  # a reset may have dropped some
        return out, (self._settled_base + start + len(ids)) if ids else after

    @property
    def unsettled_count(self) -> int:
        return len(self._unsettled)

    def in_flight(self) -> list[LedgerEntry]:
        """The entries not settled yet, in arrival order."""
        return [self.entries[rid] for rid in self._unsettled if rid in self.entries]

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
            self._unsettled.pop(rid, None)
        self._responded.difference_update(done)
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
