"""200 async users starting at once must not stall the bridge loop: their first requests reach the server promptly.

Issue 21: every async user built its own client, and with it an SSL context (~21 ms of CPU), on the one bridge
loop; the openai SDK's first request on each client also forked a `uname -p` that gevent cannot wait for there
(users/bridge.py). 64 users starting at once reached the server 3.8 s after their send stamps. Here 200 users of
each async stack are started the way Locust's runner starts them (each its own greenlet: `on_start`, then one
stream of its `stream` task), and the ledger (server truth) says when their requests arrived.

The bound, derived from what a user still costs at start, measured: on the loop, its client over the shared
SSL context and the SDK's resources (≤ 1.3 ms, openai-async, the dearer stack) and its first request's work
up to the write (~2 ms: the SDK's parameter transform and request build); in the hub, `on_start` and the
bridge calls; the two threads take turns on the GIL. All told, here (2 shared cores, load average ~3), the
200th request arrived 1.2 s (httpx-async) and 1.6 s (openai-async) after the spawn: ≤ 8 ms a user. Doubled
for a busier moment: every request must arrive within 200 × 8 ms × 2 = 3.2 s of the spawn. Before the fix the
SSL contexts alone were 200 × 21 ms = 4.2 s of the loop's CPU (plus a 16 ms fork per openai client), and this
test measured 13 s for httpx-async. The streams are 2 tokens long and the engine steps 50 ms, so streaming
itself never saturates the client while the users start.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import gevent
import pytest
from conftest import SimPool
from locust.env import Environment

from stopstorm.users.stacks import user_class

USERS = 200
ARRIVE_WITHIN_S = USERS * 0.008 * 2  # 3.2 s: see the module docstring
SIM_ARGS = ("--step-base-ms", "50", "--step-per-seq-ms", "0", "--max-num-seqs", str(USERS + 8))


def _options() -> argparse.Namespace:
    return argparse.Namespace(
        endpoint="chat", model="llm", prompts="", max_tokens=2, temperature=0.0, ignore_eos=True, no_usage=False,
        no_continuous_usage=False, api_key="", stop_probability=0.0, stop_at="tokens:fixed:1", close_mix="close:1",
        hold_seconds=0.0, think_time=0.0, read_timeout=30.0, connect_timeout=10.0, headers_timeout=60.0,
        insecure=False, arrival_rate=0.0)


def _start_users(stack: str, url: str) -> tuple[float, list[Any]]:
    """USERS users of `stack`, spawned at once; the spawn moment and their records."""
    cls = type(user_class(stack).__name__, (user_class(stack),), {"host": url})
    env = Environment(user_classes=[cls], host=url, parsed_options=_options())
    records: list[Any] = []
    env.events.request.add_listener(
        lambda context=None, **_: records.append(context["record"]) if context and "record" in context else None)

    def one_user() -> None:
        user = cls(env)
        user.on_start()
        try:
            user.stream()
        finally:
            user.on_stop()

    spawned = time.monotonic()
    greenlets = [gevent.spawn(one_user) for _ in range(USERS)]
    gevent.joinall(greenlets, timeout=60)
    assert all(g.dead for g in greenlets), "users still running after 60 s"
    assert not [g.exception for g in greenlets if g.exception], [g.exception for g in greenlets if g.exception][:3]
    return spawned, records


@pytest.mark.parametrize("stack", ["httpx-async", "openai-async"])
def test_200_async_users_start_without_stalling_the_loop(sim_pool: SimPool, stack: str) -> None:
    sim = sim_pool.fresh(*SIM_ARGS)
    spawned, records = _start_users(stack, sim.url)
    assert len(records) == USERS and all(r.error is None for r in records), [r.error for r in records if r.error][:3]
    entries = sim.wait_idle()
    arrivals = sorted(entries[f"chatcmpl-{r.request_id}"]["arrival"] - spawned for r in records)
    assert arrivals[-1] <= ARRIVE_WITHIN_S, (
        f"{stack}: the last of {USERS} first requests reached the server {arrivals[-1]:.2f} s after the spawn "
        f"(first {arrivals[0]:.2f} s, median {arrivals[USERS // 2]:.2f} s; bound {ARRIVE_WITHIN_S} s)")
