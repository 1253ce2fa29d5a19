"""Keeps Locust's own per-second request counters to the window Locust reads, so a run of hours stays flat.

Every Locust `StatsEntry` counts its requests and failures per wall-clock second (`num_reqs_per_sec`,
`num_fail_per_sec`, one dict key a second) and never drops a key. Locust reads them only for the current
RPS and failures per second (`current_rps`: the seconds from `last_request_timestamp - 12` to `- 2`); a
worker sends its counters and resets them at each report, but the master (and a single process) merges
them for the whole run: one key a second per entry, and a stopstorm run has some forty entries (each stack
by how it stopped): ~8.8 MB an hour that nothing reads (tracemalloc over 36 such dicts of 3,000 seconds;
docs/benchmarks/soak.md). Every `TRIM_EVERY_S` this drops, per entry, the seconds older than `KEEP_S`
before its stats' last request: what `current_rps` reads is never touched, so every figure Locust shows or
writes (its totals come from `num_requests` and `num_failures`, not these dicts) is unchanged.

Locust's `stats.history` (one row every 5 s for its charts) is left alone: it is the whole run's chart, ~1 MB
an hour.
"""

from __future__ import annotations

import logging
from typing import Any

import gevent
from locust.stats import RequestStats, StatsEntry

_log = logging.getLogger(__name__)

KEEP_S = 20  # current_rps reads the last 12 s before the stats' last request; 8 s to spare
TRIM_EVERY_S = 30.0


def trim_per_second_counters(stats: RequestStats, keep_s: int = KEEP_S) -> int:
    """Drop each entry's per-second counts older than `keep_s` before `stats.last_request_timestamp`;
    returns how many keys went."""
    last = stats.last_request_timestamp
    if last is None:
        return 0
    cutoff = int(last) - keep_s
    dropped = 0
    entries: list[StatsEntry] = [*stats.entries.values(), stats.total]
    for entry in entries:
        for counts in (entry.num_reqs_per_sec, entry.num_fail_per_sec):
            old = [second for second in counts if second < cutoff]
            for second in old:
                del counts[second]
            dropped += len(old)
    return dropped


def start_trimming(stats: RequestStats, every_s: float = TRIM_EVERY_S) -> Any:
    """A greenlet that trims `stats` every `every_s` seconds for the life of the process (it only sleeps in
    between; the process's exit ends it)."""

    def loop() -> None:
        while True:
            gevent.sleep(every_s)
            try:
                trim_per_second_counters(stats)
            except Exception as exc:  # Locust's structure changed under us: say so once, stop trimming
                _log.warning("stopstorm: trimming Locust's per-second counters failed (%s); stopped", exc)
                return

    return gevent.spawn(loop)
