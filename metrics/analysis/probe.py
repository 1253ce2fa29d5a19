"""The stop-semantics table: per client stack × close mode × stop point, what the server really did after Stop.

Pure functions over (record, ledger entry) pairs, so the table can be rebuilt from a saved JSON file. A row is
one stack, close mode and stop point: the matrix's rows stop after N tokens; the early-stop rows (a close 10 ms
after the send, at the first token) show how many closes the server never acted on (`ran_on`, the missed closes
of metrics/analysis/closes.py) and how many never reached the engine.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["PROBE_SCHEMA_VERSION", "ProbeCell", "ProbeSample", "summarise"]

# 2: cells gain "stop" (the row's stop point), "ran_on" and "never_reached"; the JSON a "verdict" (words)
PROBE_SCHEMA_VERSION = 2


@dataclass(frozen=True, slots=True)
class ProbeSample:
    """One probed stream: the client's Stop, and the server's truth about the same request."""

    stack: str
    close_mode: str
    stop: float | None  # client monotonic time of Stop
    tokens_read: int  # tokens the user saw before Stop
    error: str | None  # the client's failure, if any
    disconnect_seen: float | None  # server saw the connection close
    freed: float | None  # server freed the slot (or the request finished)
    finish_reason: str | None  # server's: abort, stop, length (None: still running when we gave up)
    generated_tokens: int | None  # server's count
    stop_plan: str = ""  # the record's: "tokens:20", "seconds:0.010", "first-token"
    registered: bool = True  # the server has a trace of it (a ledger entry; vLLM's `Added` line)

    @classmethod
    def from_pair(cls, record: Any, entry: dict[str, Any] | None) -> ProbeSample:
        e = entry or {}
        registered = bool(e.get("log_added", entry is not None))  # vLLM's truth says; a ledger entry is one
        return cls(record.stack, record.close_mode, record.stop, record.tokens_read, record.error,
                   e.get("disconnect_seen"), e.get("freed"), e.get("finish_reason"), e.get("generated_tokens"),
                   getattr(record, "stop_plan", ""), registered)

    @property
    def aborted(self) -> bool:
        return self.finish_reason == "abort"

    @property
    def ran_on(self) -> bool:
        """A close the server never acted on: registered, and run to its end (a `none` stream reads on)."""
        return self.registered and self.finish_reason in ("length", "stop") and self.close_mode != "none"

    @property
    def abort_latency(self) -> float | None:
        """Stop → slot freed, for a stream the server aborted."""
        if not self.aborted or self.stop is None or self.freed is None:
            return None
        return self.freed - self.stop

    @property
    def close_seen_after(self) -> float | None:
        """Stop → the server noticed the connection close (None: it never did while the request ran)."""
        if self.stop is None or self.disconnect_seen is None:
            return None
        return self.disconnect_seen - self.stop

    @property
    def wasted_tokens(self) -> int | None:
        """Tokens the server generated that the user never read."""
        if self.generated_tokens is None:
            return None
        return max(0, self.generated_tokens - self.tokens_read)


@dataclass(frozen=True, slots=True)
class ProbeCell:
    stack: str
    close_mode: str
    streams: int
    failed: int
    aborted: int
    abort_latency_ms_p50: float | None
    abort_latency_ms_max: float | None
    close_seen_ms_p50: float | None
    wasted_tokens_mean: float | None
    outcome: str  # one phrase: what happened after Stop
    stop: str = ""  # the row's stop point (the streams' stop plan)
    ran_on: int = 0  # closes the server never acted on: the request ran to its end
    never_reached: int = 0  # closed before the server registered the request: no work

    @property
    def early(self) -> bool:
        """An early-stop row: a close before or at the first token."""
        return self.stop.startswith("seconds:") or self.stop == "first-token"


def _ms(values: list[float], how: str) -> float | None:
    if not values:
        return None
    return round((statistics.median(values) if how == "p50" else max(values)) * 1e3, 2)


def _outcome(ok: list[ProbeSample]) -> str:
    """What happened after Stop, in one phrase."""
    aborted = sum(s.aborted for s in ok)
    never = sum(not s.registered for s in ok)
    ran_on = sum(s.ran_on for s in ok)
    unfinished = sum(s.registered and s.finish_reason is None for s in ok)
    if not ok:
        return "no stream completed its Stop"
    if aborted == len(ok):
        return "aborted: slot freed"
    if never == len(ok):
        return "never reached the engine: no work"
    if aborted == 0 and never == 0:
        return ("not aborted: ran to the end" if not unfinished
                else f"still running when the probe gave up ({unfinished})")
    parts = [f"mixed: {aborted}/{len(ok)} aborted"]
    parts += [f"{n} {what}" for n, what in ((ran_on, "ran on"), (never, "never reached the engine"),
                                            (unfinished, "still running")) if n]
    return ", ".join(parts)


def summarise(samples: Iterable[ProbeSample]) -> list[ProbeCell]:
    """One cell per stack × close mode × stop point, in the order the probe walked them."""
    cells: dict[tuple[str, str, str], list[ProbeSample]] = {}
    for s in samples:
        cells.setdefault((s.stack, s.close_mode, s.stop_plan), []).append(s)
    out = []
    for (stack, mode, stop), group in cells.items():
        ok = [s for s in group if s.error is None and s.stop is not None]
        latencies = [s.abort_latency for s in ok if s.abort_latency is not None]
        seen = [s.close_seen_after for s in ok if s.close_seen_after is not None]
        wasted = [s.wasted_tokens for s in ok if s.wasted_tokens is not None]
        out.append(ProbeCell(stack, mode, len(group), len(group) - len(ok), sum(s.aborted for s in ok),
                             _ms(latencies, "p50"), _ms(latencies, "max"), _ms(seen, "p50"),
                             round(statistics.fmean(wasted), 1) if wasted else None, _outcome(ok), stop,
                             sum(s.ran_on for s in ok), sum(not s.registered for s in ok)))
    return out
