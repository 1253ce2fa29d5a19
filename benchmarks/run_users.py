"""N real stopstorm users of one stack, all started at once as Locust spawns them; records and loop lag as JSON.

    python benchmarks/run_users.py --stack openai-async --url http://127.0.0.1:8009 --users 200 \\
        [--streams-per-user 1] [--tokens 64] [--cpu 1] --out run.json

Why real users and not bare `run_stream` calls (benchmarks/bench_timing.py builds its transports before it
starts the clock): what users pay at start-up (`on_start`, a transport built on the bridge's loop, the SDK
client an async transport builds at its first stream) is part of what a run measures, and it is exactly what
issue 21 found stalling the bridge. So each user here is the stack's own Locust user class, driven the way
Locust's runner drives it: `on_start()`, then its `stream` task `--streams-per-user` times back to back (no
think time, like a closed-loop tool at fixed concurrency), then `on_stop()`. Records come from the users' own
`request` events (the record rides in `context`), so nothing here stamps anything.

The process is gevent-patched first, as a locustfile is, and pins itself to `--cpu` (one core, as a Locust
worker owns). A SelfMonitor (metrics/plugin/self_monitor.py) samples the hub and the bridge loop every 5 ms from
before the first user starts; the bridge is started first so its lag is seen from the first user's
`on_start`. Written out: every record's marks, the monitor's summary, the bridge loop's worst stalls (start
time and length, monotonic clock, so a reader can line them up with the ledger) and this process's CPU time
over the load. Loopback only; bounded by `--timeout`.
"""

# ruff: noqa: E402  (gevent must patch before anything imports ssl, threading or socket)

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import gevent
from locust.env import Environment

# STOPSTORM_ROOT: run another checkout's users (an older commit's worktree, for a before/after measurement); it must
# have the one-import-name layout (stopstorm/ at its root: commit 7111e3c or later).
ROOT = Path(os.environ.get("STOPSTORM_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from stopstorm.metrics.plugin.self_monitor import SelfMonitor
from stopstorm.users.bridge import get_bridge
from stopstorm.users.stacks import STACKS, is_async, user_class

__all__ = ["options", "run"]

MONITOR_INTERVAL_S = 0.005


def options(tokens: int, model: str = "llm") -> argparse.Namespace:
    """stopstorm's options for a plain timing run: chat, `tokens` tokens per stream (ignore_eos), continuous
    usage, nobody presses Stop, no think time."""
    return argparse.Namespace(
        endpoint="chat", model=model, prompts="", max_tokens=tokens, temperature=0.0, ignore_eos=True,
        no_usage=False, no_continuous_usage=False, api_key="", stop_probability=0.0, stop_at="tokens:fixed:1",
        close_mix="close:1", hold_seconds=0.0, think_time=0.0, read_timeout=30.0, connect_timeout=10.0,
        headers_timeout=60.0, insecure=False, arrival_rate=0.0)


class _StallWatch:
    """The bridge loop's longest oversleeps, with when they began: a lag histogram says how bad, this says
    when (a start-up stall lines up with the first requests' ingress)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stalls: list[tuple[float, float]] = []  # (sleep started, overslept by), monotonic seconds
        self._stop = False

    async def watch(self) -> None:
        clock = time.monotonic
        while not self._stop:
            t0 = clock()
            await asyncio.sleep(self.interval)
            lag = clock() - t0 - self.interval
            if lag > 0.002:
                self.stalls.append((t0, lag))

    def stop(self) -> None:
        self._stop = True


def run(stack: str, url: str, users: int, streams_per_user: int, tokens: int, timeout: float) -> dict[str, Any]:
    """Start `users` users of `stack` at once; return their records, the monitor's summary and the CPU used."""
    # Locust's runner gives every user class the run's host the same way (`user_class.host = environment.host`).
    cls = type(user_class(stack).__name__, (user_class(stack),), {"host": url})
    env = Environment(user_classes=[cls], host=url, parsed_options=options(tokens))
    records: list[Any] = []

    def on_request(context: dict[str, Any] | None = None, **_: Any) -> None:
        record = (context or {}).get("record")
        if record is not None:
            records.append(record)

    env.events.request.add_listener(on_request)
    watch = _StallWatch(MONITOR_INTERVAL_S)
    watch_future = None
    if is_async(stack):
        bridge = get_bridge()
        watch_future = asyncio.run_coroutine_threadsafe(watch.watch(), bridge.loop)
    monitor = SelfMonitor(interval=MONITOR_INTERVAL_S, bound=0.001).start()
    gevent.sleep(0.05)  # the monitor's sleepers are running (and attached to the bridge) before any user starts

    def one_user() -> None:
        user = cls(env)
        user.on_start()
        try:
            for _ in range(streams_per_user):
                user.stream()
        finally:
            user.on_stop()

    c0, t0 = time.process_time(), time.monotonic()
    greenlets = [gevent.spawn(one_user) for _ in range(users)]
    gevent.joinall(greenlets, timeout=timeout)
    cpu, wall = time.process_time() - c0, time.monotonic() - t0
    unfinished = sum(1 for g in greenlets if not g.dead)
    errors = [repr(g.exception) for g in greenlets if g.dead and g.exception is not None]
    gevent.killall([g for g in greenlets if not g.dead], timeout=5)
    monitor.stop()
    watch.stop()
    if watch_future is not None:
        with contextlib.suppress(Exception):
            watch_future.result(timeout=1)
    return {
        "stack": stack, "users": users, "streams_per_user": streams_per_user, "tokens": tokens, "pid": os.getpid(),
        "started": t0, "wall_s": wall, "cpu_s": cpu, "unfinished_users": unfinished, "user_errors": errors[:5],
        "self_monitor": monitor.summary(),
        "bridge_stalls": sorted(watch.stalls, key=lambda s: -s[1])[:50],
        "records": [{k: v for k, v in r.to_json().items()
                     if k in ("request_id", "sent", "written", "headers", "first_token", "chunk_times",
                              "chunk_tokens", "ended", "error", "ttft", "tokens", "done", "stamp_clock")}
                    for r in records],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", required=True, choices=list(STACKS))
    parser.add_argument("--url", required=True)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--streams-per-user", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cpu", type=int, default=None, help="pin this process (every thread) to this CPU")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})  # before the bridge's thread exists: it inherits the mask
    result = run(args.stack, args.url.rstrip("/"), args.users, args.streams_per_user, args.tokens, args.timeout)
    Path(args.out).write_text(json.dumps(result))
    print(f"{args.stack}: {len(result['records'])} streams, {result['unfinished_users']} users unfinished, "
          f"{result['cpu_s']:.2f} s CPU in {result['wall_s']:.2f} s", flush=True)
    if result["user_errors"]:
        sys.exit(f"users failed: {result['user_errors']}")


if __name__ == "__main__":
    main()
