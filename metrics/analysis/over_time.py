"""The run over time, in bins: zombies held, tokens generated against tokens delivered (goodput against
throughput). The report's plots over time and the web UI's live chart draw this table.

The capacity section's timeline already has running and waiting at every change; what it lacks is who held
the slots for nobody, and how much of what the engine made reached a reader. Zombies follow the accounting's
rule (a stopped stream whose request still held its slot `grace` seconds after Stop: from then until freed, or
the run's end); generated tokens are the ledger's, each request's spread evenly between its first and last
token; delivered tokens are the clients' chunks up to each user's Stop. Pure: records and a ledger in, a table out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from stopstorm.metrics.analysis.accounting import server_id
from stopstorm.metrics.figures import CLIENT_SOURCE, LEDGER_SOURCE, Table
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.ledger import LedgerSnapshot

__all__ = ["OVER_TIME_COLUMNS", "bin_width", "over_time"]

OVER_TIME_COLUMNS = ("t_s", "zombies", "generated_tok_s", "delivered_tok_s")
_WIDTHS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def bin_width(duration_s: float, max_bins: int = 240) -> float:
    """The narrowest round width that cuts `duration_s` into at most `max_bins` bins."""
    for w in _WIDTHS:
        if duration_s / w <= max_bins:
            return w
    return math.ceil(duration_s / max_bins)


def _spread(out: list[float], t0: float, w: float, start: float, end: float, amount: float) -> None:
    """Add `amount` spread evenly over [start, end] into the bins of `out` (all at `start` when end ≤ start)."""
    n = len(out)
    if end <= start:
        k = int((start - t0) // w)
        if 0 <= k < n:
            out[k] += amount
        return
    rate = amount / (end - start)
    k = max(0, int((start - t0) // w))
    while k < n:
        lo, hi = t0 + k * w, t0 + (k + 1) * w
        if lo >= end:
            break
        overlap = min(hi, end) - max(lo, start)
        if overlap > 0:
            out[k] += rate * overlap
        k += 1


def over_time(records: Sequence[StreamRecord], ledger: LedgerSnapshot | None, started: float, ended: float,
              grace_s: float, width_s: float | None = None) -> Table | None:
    """Bins of `width_s` from the run's start: [t_s, zombies (the most held at once in the bin), generated
    tokens/s, delivered tokens/s]; generated and zombies are None without a ledger. None for an empty run."""
    duration = ended - started
    if duration <= 0 or not records:
        return None
    w = width_s or bin_width(duration)
    n = max(1, math.ceil(duration / w - 1e-9))
    delivered = [0.0] * n
    for r in records:
        last = 0
        limit = r.stop
        for t, tokens in zip(r.chunk_times, r.chunk_tokens, strict=False):
            if limit is not None and t > limit:
                break
            k = int((t - started) // w)
            if 0 <= k < n:
                delivered[k] += tokens - last
            last = tokens
    generated: list[float] | None = None
    zombies: list[int] | None = None
    if ledger is not None:
        generated = [0.0] * n
        for e in ledger.served:
            if e.first_token is not None and e.generated_tokens:
                _spread(generated, started, w, e.first_token, e.last_token or e.first_token,
                        float(e.generated_tokens))
        entries = ledger.by_id
        events: list[tuple[float, int]] = []
        for r in records:
            joined = entries.get(server_id(r))
            if r.stop is None or joined is None or joined.scheduled is None:
                continue
            end = joined.freed if joined.freed is not None else ledger.now
            if end - r.stop <= grace_s:
                continue
            events += [(max(r.stop + grace_s, joined.scheduled), 1), (end, -1)]
        events.sort()
        zombies = [0] * n
        held = 0
        i = 0
        for k in range(n):
            lo, hi = started + k * w, started + (k + 1) * w
            while i < len(events) and events[i][0] <= lo:  # what changed at or before the bin's start
                held += events[i][1]
                i += 1
            peak = held  # the zombies held as the bin starts, then the most at once within it
            while i < len(events) and events[i][0] < hi:
                held += events[i][1]
                peak = max(peak, held)
                i += 1
            zombies[k] = peak
    rows = []
    for k in range(n):
        rows.append([round(k * w, 3), None if zombies is None else zombies[k],
                     None if generated is None else round(generated[k] / w, 3), round(delivered[k] / w, 3)])
    source = f"{LEDGER_SOURCE} (zombies, generated); {CLIENT_SOURCE} (delivered)" if ledger is not None else \
        f"{CLIENT_SOURCE} (delivered)"
    return Table(OVER_TIME_COLUMNS, rows, source)
