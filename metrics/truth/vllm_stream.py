"""Per-stream server truth from real vLLM, for streams run one at a time (the probe, the real-vLLM tests).

Real vLLM has no ledger. What it does give: its request log (`Added request …` / `Aborted request …`, followed
live and stamped as each line is read, metrics/truth/vllm_log.py) and its `/metrics` counters
(metrics/truth/vllm_metrics.py). With one stream in flight at a time, the counters' change over that stream
*is* that request's truth: Δ`generation_tokens_total` is exactly the tokens the engine generated for it, and
Δ`request_success_total{finished_reason}` says how it finished, unless it was aborted by a client disconnect,
which vLLM counts nowhere there (its blind spot) and only the log line shows.

`VllmStreamTruth.settle` returns a dict shaped like a simulator ledger entry (the keys the probe's table and
the tests read), so the same table is built from either truth:

- `finish_reason`: `abort` when the log shows the abort line, else the reason whose success counter rose,
  else None (still running when we gave up);
- `freed`: for an abort, when its abort line was read (`time.monotonic()`): the engine frees the slot at about
  that time, plus the log's write and the follower's poll (20 ms by default); None otherwise;
- `disconnect_seen`: None: vLLM logs no such moment;
- `generated_tokens`: Δ`generation_tokens_total` over the stream.

A concurrent stream would make every one of these wrong; callers run streams one at a time.
"""

from __future__ import annotations

import os
import time
from typing import Any

from stopstorm.metrics.truth.vllm_log import LineFollower, LogFollower
from stopstorm.metrics.truth.vllm_metrics import MetricsScraper, MetricsSnapshot, diff

__all__ = ["VLLM_TRUTH_SOURCE", "VllmStreamTruth"]

VLLM_TRUTH_SOURCE = "vLLM log (abort line read) + vLLM metrics (Δ counters per stream)"


class VllmStreamTruth:
    """Follows vLLM's log and reads its `/metrics` around each stream; see the module docstring."""

    def __init__(self, host: str, log: str | os.PathLike[str] | LineFollower, poll: float = 0.02) -> None:
        """`log`: vLLM's log file, followed here; or a follower already running elsewhere (the plugin's, for a
        log read through a command or stdin, which has one reader), never started or stopped here."""
        self.host = host.rstrip("/")
        self._owns_log = not isinstance(log, LineFollower)
        self.log: LineFollower = log if isinstance(log, LineFollower) else LogFollower(log, poll=poll)
        self.metrics = MetricsScraper(f"{self.host}/metrics", interval=poll, timeout=5.0)
        self._before: MetricsSnapshot | None = None

    def start(self) -> VllmStreamTruth:
        if self._owns_log:
            self.log.start()
        return self

    def available(self) -> bool:
        """True when `/metrics` answers with vLLM's counters."""
        snap = self.metrics.scrape_once()
        return snap is not None and snap.total("generation_tokens") is not None

    def before_stream(self) -> None:
        """Mark the counters just before a stream is sent."""
        self._before = self._scrape()

    def _scrape(self) -> MetricsSnapshot:
        snap = self.metrics.scrape_once()
        if snap is None:
            raise RuntimeError(f"cannot read {self.metrics.url}: {self.metrics.last_error}")
        return snap

    def settle(self, server_id: str, timeout: float, quiet_s: float = 0.3, poll: float = 0.05,
               unregistered_s: float = 1.0) -> dict[str, Any]:
        """The stream's truth once it has left the engine (its abort line, or a success counter rose) and
        `generation_tokens_total` has not moved for `quiet_s`; or as it is at `timeout`. A request the log has
        not named (`Added`) while the engine ran and queued nothing for `unregistered_s` never reached it (a
        close before vLLM's handler had rendered it): its truth is given then, not at `timeout`."""
        if self._before is None:
            raise RuntimeError("before_stream() was not called")
        before = self._before
        began = time.monotonic()
        deadline = began + timeout
        last_gen: float | None = None
        still_since = idle_since = began
        while True:
            snap = self._scrape()
            d = diff(before, snap).total
            gen = d.generation_tokens
            now = time.monotonic()
            if gen != last_gen:
                last_gen, still_since = gen, now
            if (snap.total("running") or 0) + (snap.total("waiting") or 0) > 0:
                idle_since = now
            reasons = {r: v for r, v in (d.success or {}).items() if v > 0}
            added, aborted = self.log.lookup(server_id)
            done = aborted is not None or bool(reasons)
            never = added is None and now - idle_since >= unregistered_s and now - still_since >= quiet_s
            if (done and now - still_since >= quiet_s) or never or now >= deadline:
                break
            time.sleep(poll)
        added = self.log.lookup(server_id)[0]
        if aborted is not None:
            reason: str | None = "abort"
        elif reasons:
            reason = max(reasons, key=lambda r: reasons[r])
        else:
            reason = None
        return {
            "request_id": server_id,
            "finish_reason": reason,
            "freed": aborted.seen if aborted is not None else None,
            "disconnect_seen": None,
            "generated_tokens": int(gen) if gen is not None else None,
            "log_added": added is not None,
            "log_aborted_raw_id": aborted.request_id_raw if aborted is not None else None,
            "success_delta": reasons,
            "counted_abort": reasons.get("abort", 0.0),
        }

    def close(self) -> None:
        if self._owns_log:
            self.log.stop()
        self.metrics.close()
