"""The stop-semantics table: per client stack × close mode, what the server really did after Stop.

Pure functions over (record, ledger entry) pairs, so the table can be rebuilt from a saved JSON file.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["PROBE_SCHEMA_VERSION", "ProbeCell", "ProbeSample", "summarise"]

PROBE_SCHEMA_VERSION = 1


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

    @classmethod
    def from_pair(cls, record: Any, entry: dict[str, Any] | None) -> ProbeSample:
        e = entry or {}
        return cls(record.stack, record.close_mode, record.stop, record.tokens_read, record.error,
                   e.get("disconnect_seen"), e.get("freed"), e.get("finish_reason"), e.get("generated_tokens"))

    @property
    def aborted(self) -> bool:
        return self.finish_reason == "abort"

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


def _ms(values: list[float], how: str) -> float | None:
    if not values:
        return None
    return round((statistics.median(values) if how == "p50" else max(values)) * 1e3, 2)


def summarise(samples: Iterable[ProbeSample]) -> list[ProbeCell]:
    cells: dict[tuple[str, str], list[ProbeSample]] = {}
    for s in samples:
        cells.setdefault((s.stack, s.close_mode), []).append(s)
    out = []
    for (stack, mode), group in cells.items():
        ok = [s for s in group if s.error is None and s.stop is not None]
        latencies = [s.abort_latency for s in ok if s.abort_latency is not None]
        seen = [s.close_seen_after for s in ok if s.close_seen_after is not None]
        wasted = [s.wasted_tokens for s in ok if s.wasted_tokens is not None]
        aborted = sum(s.aborted for s in ok)
        if not ok:
            outcome = "no stream completed its Stop"
        elif aborted == len(ok):
            outcome = "aborted: slot freed"
        elif aborted == 0:
            unfinished = sum(s.finish_reason is None for s in ok)
            outcome = ("not aborted: ran to the end" if not unfinished
                       else f"still running when the probe gave up ({unfinished})")
        else:
            outcome = f"mixed: {aborted}/{len(ok)} aborted"
        out.append(ProbeCell(stack, mode, len(group), len(group) - len(ok), aborted, _ms(latencies, "p50"),
                             _ms(latencies, "max"), _ms(seen, "p50"),
                             round(statistics.fmean(wasted), 1) if wasted else None, outcome))
    return out
