"""Locust's per-second counters trimmed to the window Locust reads: the figures it shows stay the same."""

from __future__ import annotations

from unittest import mock

from locust.stats import RequestStats

from stopstorm.metrics.plugin.locust_stats import KEEP_S, trim_per_second_counters


def _stats_over(seconds: int, start: float = 1_800_000_000.0) -> RequestStats:
    """One request a second (and a failure every third) on two entries, for `seconds` seconds."""
    stats = RequestStats()
    stats.total.start_time = start
    for i in range(seconds):
        with mock.patch("locust.stats.time.time", return_value=start + i + 0.5):
            for name in ("openai close stop", "httpx drop stop"):
                stats.log_request("POST", name, 100 + i % 7, 10)
                if i % 3 == 0:
                    stats.log_error("POST", name, "cut")
    return stats


def _shown(stats: RequestStats) -> list[tuple[object, ...]]:
    return [(e.name, e.num_requests, e.num_failures, e.current_rps, e.current_fail_per_sec, e.total_rps,
             e.get_response_time_percentile(0.95)) for e in [*stats.entries.values(), stats.total]]


def test_trim_keeps_what_locust_reads_and_drops_the_rest() -> None:
    stats = _stats_over(600)
    before = _shown(stats)
    assert len(stats.total.num_reqs_per_sec) == 600  # the growth: one key a second, never dropped by Locust
    dropped = trim_per_second_counters(stats)
    assert _shown(stats) == before  # current and total RPS, counts, percentiles: unchanged
    for entry in [*stats.entries.values(), stats.total]:
        kept = range(int(stats.last_request_timestamp) - KEEP_S, int(stats.last_request_timestamp) + 1)
        assert sorted(entry.num_reqs_per_sec) == list(kept)  # the last KEEP_S seconds and the current one
        assert sorted(entry.num_fail_per_sec) == [s for s in kept if (s - 1_800_000_000) % 3 == 0]
    kept_fails = sum(1 for i in range(600 - KEEP_S - 1, 600) if i % 3 == 0)
    assert dropped == 3 * (600 - KEEP_S - 1) + 3 * (200 - kept_fails)  # two entries and the total
    assert trim_per_second_counters(stats) == 0  # nothing more to drop until time moves on


def test_trim_of_empty_stats_is_a_no_op() -> None:
    assert trim_per_second_counters(RequestStats()) == 0
