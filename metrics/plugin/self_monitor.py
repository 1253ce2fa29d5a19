"""Self-monitoring: is this load generator itself the bottleneck? Loop lag and CPU, per process.

A load tester whose own CPU or event loop is saturated reports its own delays as the server's: a chunk that
arrived on time but was read 20 ms late inflates TTFT and ITL by 20 ms. So every run measures, in every
Locust process (local, master or worker):

- the gevent hub's lag: a greenlet sleeps a fixed interval and measures how much it overslept (every
  greenlet that was ready at the same time waited as long: sync stacks stamp their chunks on this hub);
- the asyncio bridge loop's lag (users/bridge.py, where the async stacks stamp theirs), the same way, once
  the bridge exists (it announces itself through `watch_loop`);
- the process's CPU time over the run's wall time (and the bridge thread's own, where the OS gives it);
- the garbage collector's pauses (`gc.callbacks`), which stop every thread at once.

A stall longer than `--max-loop-lag-ms` becomes a *lagged window* (from the sleep's start to the wake-up).
A first-token or chunk stamp taken while its loop was late (in such a window, or just after it) is flagged,
and an ITL gap with a flagged end: those figures may hold the tool's own delay, and the report says how many.
Streams are checked as their `request` event fires, so a worker keeps only counts, never the records.

`summary()` is a small plain dict (JSON-safe, picklable) so it can travel from a worker to the master in
Locust's `report_to_master` payload; the master keeps one per worker id, and the report holds them all under
`self_monitor` keyed by process (`local`, `master`, or the worker's client id).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from operator import itemgetter
from typing import Any, Protocol

import gevent
from locust import events
from locust.argument_parser import LocustArgumentParser

from stopstorm.metrics.plugin import options
from stopstorm.metrics.record import StreamRecord

__all__ = [
    "GcPauses",
    "LagHistogram",
    "LagSampler",
    "SelfMonitor",
    "WatchedLoop",
    "add_arguments",
    "check_options",
    "from_options",
    "process_key",
    "summaries",
    "watch_loop",
]

_MAX_WINDOWS = 10_000  # lagged windows kept for flagging (the oldest go first); counts stay exact

# Lag histogram: 0.1 ms buckets below 10 ms, 1 ms buckets up to 1 s, then one overflow bucket. Bounded
# memory for any run length, and a summary that costs a walk over ~1,100 counts, not a sort.
_FINE_S, _FINE_N = 1e-4, 100
_COARSE_S, _COARSE_N = 1e-3, 990


def _bucket(lag: float) -> int:
    if lag < _FINE_S * _FINE_N:
        return int(lag / _FINE_S)
    return min(_FINE_N + int(lag / _COARSE_S) - 10, _FINE_N + _COARSE_N)


def _bucket_top(i: int) -> float:
    """Upper edge of bucket i in seconds (the overflow bucket's is reported as the exact max instead)."""
    return (i + 1) * _FINE_S if i < _FINE_N else (i - _FINE_N + 11) * _COARSE_S


class LagHistogram:
    """Counts of lag samples; percentiles to the bucket's upper edge (0.1 ms below 10 ms, 1 ms above)."""

    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts = [0] * (_FINE_N + _COARSE_N + 1)
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, lag: float, n: int = 1) -> None:
        """`n` samples of `lag` seconds."""
        self.counts[_bucket(lag)] += n
        self.count += n
        self.total += lag * n
        if lag > self.max:
            self.max = lag

    def percentile(self, p: float) -> float:
        rank = p * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if c and seen >= rank:
                return min(_bucket_top(i), self.max)
        return self.max

    def stats(self) -> dict[str, Any] | None:
        """count, p50, p99, max and mean in milliseconds; None when there are no samples."""
        if not self.count:
            return None
        return {"count": self.count, "p50_ms": round(self.percentile(0.5) * 1e3, 3),
                "p99_ms": round(self.percentile(0.99) * 1e3, 3), "max_ms": round(self.max * 1e3, 3),
                "mean_ms": round(self.total / self.count * 1e3, 3)}


_start_of = itemgetter(0)


class LagSampler:
    """One loop's lag samples and lagged windows. `tick()` is fed by whatever sleeps on that loop.

    The windows are kept sorted by start (ticks come in time order from one loop), so a span's overlap test
    is a bisect. Appends from another thread are safe under the GIL (each is one list/array operation).
    """

    def __init__(self, interval: float, bound: float) -> None:
        self.interval = interval
        self.bound = bound
        self.histogram = LagHistogram()
        self.lagged_count = 0
        self.lagged_seconds = 0.0
        # (start, end) of each stall, in time order; one list so that a reader in another thread never sees a
        # start without its end (each append or delete is one atomic list operation under the GIL).
        self._windows: list[tuple[float, float]] = []
        self.last_wake: float | None = None  # when the sleeper last woke (the loop was alive then)

    def tick(self, slept_from: float, woke: float) -> None:
        """One sleep of `interval` that began at `slept_from` and ended at `woke` (monotonic seconds)."""
        lag = max(0.0, woke - slept_from - self.interval)
        self.histogram.add(lag)
        if lag > self.bound:
            self.lagged_count += 1
            self.lagged_seconds += lag
            if len(self._windows) >= _MAX_WINDOWS:
                del self._windows[0]
            self._windows.append((slept_from, woke))
        self.last_wake = woke

    def lateness(self, t: float, now: float | None = None) -> float:
        """At most how late a stamp taken on this loop at `t` was, measured: the time since the loop stalled,
        when a stall over the bound was going on at `t` or had just ended (a greenlet woken by bytes that
        arrived in the stall runs, and stamps, only after it: within `bound` of the sampler's own wake); 0 when
        the loop ran on time then, so the stamp is late by no more than the bound.

        A stall still going on (the sleeper overdue at `now`) counts from when the sleeper was due.
        """
        if now is not None and self.last_wake is not None:
            due = self.last_wake + self.interval
            if now - due > self.bound and t > due:
                return t - due
        windows = self._windows
        i = bisect.bisect_right(windows, t, key=_start_of)  # the last window starting at or before t
        try:
            start, woke = windows[i - 1] if i > 0 else (0.0, -1.0)
        except IndexError:  # the oldest window was dropped (at the cap) by the other thread meanwhile
            return 0.0
        stalled_from = start + self.interval  # the sleeper was due then: the loop was held from there on
        return t - stalled_from if stalled_from < t <= woke + self.bound else 0.0

    def calm(self, start: float, end: float, now: float | None = None) -> bool:
        """No stall over the bound reaches into [start, end]: every stamp taken then was on time."""
        return not self.overlaps(start - max(self.interval, self.bound), end + self.bound, now)

    def overlaps(self, start: float, end: float, now: float | None = None) -> bool:
        """Did the loop lag beyond the bound at any time in [start, end]?

        Also true when the loop is lagging right now (its sleeper is overdue) and the span reaches into
        the overdue stretch: a stall is only recorded once the sleeper wakes, which may be after the
        stream that suffered it reports.
        """
        if now is not None and self.last_wake is not None:
            overdue_from = self.last_wake  # the sleeper should have woken by last_wake + interval + bound
            if now - overdue_from > self.interval + self.bound and end >= overdue_from:
                return True
        windows = self._windows
        i = bisect.bisect_right(windows, end, key=_start_of)  # windows starting at or before the span's end
        # The windows are disjoint and in time order, so only the last of them can reach into the span.
        try:
            return i > 0 and windows[i - 1][1] >= start
        except IndexError:  # the oldest window was dropped (at the cap) by the other thread meanwhile
            return True

    def stats(self) -> dict[str, Any] | None:
        out = self.histogram.stats()
        if out is None:
            return None
        out["lagged"] = self.lagged_count
        out["lagged_s"] = round(self.lagged_seconds, 4)
        return out


class GcPauses:
    """The garbage collector's pauses (gc.callbacks): a full collection over many live objects stops every
    thread for tens of ms, the likeliest cause of a stall that CPU % does not explain."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]  # by generation
        self.total = 0.0
        self.max = 0.0
        self._t0: float | None = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            pause = time.perf_counter() - self._t0
            self._t0 = None
            self.collections[info.get("generation", 0)] += 1
            self.total += pause
            self.max = max(self.max, pause)

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def stats(self) -> dict[str, Any]:
        return {"collections": list(self.collections), "pause_total_s": round(self.total, 4),
                "pause_max_ms": round(self.max * 1e3, 3)}


def _late(h: LagHistogram) -> dict[str, float | None]:
    """A timing figure's error bar: p99 and max of its stamps' lateness bounds, ms (None: nothing checked)."""
    if not h.count:
        return {"late_p99_ms": None, "late_max_ms": None}
    return {"late_p99_ms": round(h.percentile(0.99) * 1e3, 3), "late_max_ms": round(h.max * 1e3, 3)}


def _thread_cpu(ident: int | None) -> float | None:
    """CPU seconds of the real thread `ident` (Linux: its pthread CPU clock), None where unavailable."""
    if ident is None or not hasattr(time, "pthread_getcpuclockid"):
        return None
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (OSError, OverflowError, ValueError):
        return None


class WatchedLoop(Protocol):
    """An asyncio loop in a thread of its own that stamps timings (stopstorm.users.bridge's), announced here."""

    pid: int

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def thread_ident(self) -> int | None: ...

    @property
    def closed(self) -> bool: ...


_watched: list[WatchedLoop] = []


def watch_loop(bridge: WatchedLoop) -> None:
    """Announce the process's asyncio bridge (it calls this when it starts), so its lag is sampled too; the
    monitor never starts a bridge the run does not use."""
    _watched[:] = [bridge]


class SelfMonitor:
    """The process's own health during a run: hub lag, bridge-loop lag, CPU, and the timings it doubts."""

    def __init__(self, interval: float = 0.01, bound: float = 0.005) -> None:
        if interval <= 0:
            raise ValueError("the loop-lag sampling interval must be > 0")
        if bound < 0:
            raise ValueError("--max-loop-lag-ms must be >= 0")
        self.interval = interval
        self.bound = bound
        self.hub = LagSampler(interval, bound)
        self.bridge = LagSampler(interval, bound)
        self.gc = GcPauses()
        self._greenlet: gevent.Greenlet | None = None
        self._bridge_future: Any = None
        self._bridge: Any = None
        self._bridge_cpu0: float | None = None
        self._stopping = False
        self.started: float | None = None
        self.stopped: float | None = None
        self._cpu0 = 0.0
        self._cpu1: float | None = None
        self._bridge_cpu1: float | None = None
        self.ttft_checked = self.ttft_flagged = 0
        self.itl_checked = self.itl_flagged = 0
        # Of those, stamps the kernel took (users/socket_stamps.py): exact unless a late read batched chunks
        self.ttft_kernel = self.itl_kernel = 0
        # Each checked stamp's measured upper bound on its own lateness (the bound itself where the loop was on
        # time): the error bar of the TTFT and ITL figures, as a distribution.
        self.ttft_late = LagHistogram()
        self.itl_late = LagHistogram()

    # -- running ------------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._greenlet is not None and not self._greenlet.dead

    def start(self) -> SelfMonitor:
        self.gc.start()
        self.started = time.monotonic()
        self._cpu0 = time.process_time()
        self._stopping = False
        self._greenlet = gevent.spawn(self._hub_sleeper)
        return self

    def _hub_sleeper(self) -> None:
        interval, tick, sleep, clock = self.interval, self.hub.tick, gevent.sleep, time.monotonic
        while not self._stopping:
            t0 = clock()
            sleep(interval)
            tick(t0, clock())
            if self._bridge_future is None:
                self._attach_bridge()

    def _attach_bridge(self) -> None:
        """Start the bridge loop's sleeper once the bridge exists (async stacks start it on first use)."""
        bridge = _watched[-1] if _watched else None
        if bridge is None or bridge.closed or bridge.pid != os.getpid():
            return
        self._bridge = bridge
        self._bridge_cpu0 = _thread_cpu(bridge.thread_ident)
        self._bridge_future = asyncio.run_coroutine_threadsafe(self._loop_sleeper(), bridge.loop)

    async def _loop_sleeper(self) -> None:
        interval, tick, clock = self.interval, self.bridge.tick, time.monotonic
        while not self._stopping:
            t0 = clock()
            await asyncio.sleep(interval)
            tick(t0, clock())

    def stop(self) -> None:
        """Stop sampling and read the CPU clocks; idempotent."""
        if self.stopped is not None:
            return
        self._stopping = True
        self.gc.stop()
        self.stopped = time.monotonic()
        self._cpu1 = time.process_time()
        if self._bridge is not None:
            self._bridge_cpu1 = _thread_cpu(self._bridge.thread_ident)
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        if self._bridge_future is not None:
            self._bridge_future.cancel()

    # -- judging timings ----------------------------------------------------------------------------------

    def _sampler(self, record: Any) -> LagSampler:
        return self.bridge if str(getattr(record, "stack", "")).endswith("-async") else self.hub

    @staticmethod
    def _first_token_lateness(record: Any, sampler: LagSampler, shared: list[float] | None,
                              now: float) -> float | None:
        first = getattr(record, "first_token", None)
        if first is None:
            return None
        late = sampler.lateness(first, now)
        times = getattr(record, "chunk_times", None) or []
        if shared is not None and times and first == times[0]:
            late = max(late, shared[0])
        return late

    def ttft_lateness(self, record: Any, now: float | None = None) -> float | None:
        """The bound `check` gives this record's first-token stamp (seconds; over `bound` means flagged), for a
        benchmark that judges each stream as the monitor does; None without a first token."""
        return self._first_token_lateness(record, self._sampler(record), _shared_read_bounds(record),
                                          time.monotonic() if now is None else now)

    def check(self, record: Any, now: float | None = None) -> None:
        """Judge the record's first-token and chunk stamps by the loop that took them (the bridge loop for
        async stacks, the hub for the others): a stamp is flagged only when that loop was late at the moment
        it was taken, by more than the bound, and every stamp gets the measured bound of its lateness. (A stall
        in the middle of a wait does not delay the stamp that ends the wait, so the wait itself is not judged.)

        Kernel stamps (`stamp_clock` "kernel", users/socket_stamps.py) are judged by the same rule, and counted
        too. A read the loop let through on time returns one chunk with its own arrival; a read that came late
        may return several chunks, and the kernel gives one stamp a read, the last segment's, so the earlier
        chunks carry a later arrival than their own. The loop's lag at the stamp does not always show it (at
        500 streams a process reads came 60-130 ms late with the hub's timer lag p99 at 15-20 ms, and those
        TTFTs went unflagged), but the record does: chunks of one read share one stamp exactly. Such a chunk is
        late by at most the time since the stamp before that read (the headers', or the write's), its bound."""
        kernel = getattr(record, "stamp_clock", None) == "kernel"
        times: Sequence[float] = getattr(record, "chunk_times", None) or []
        if kernel:
            if getattr(record, "first_token", None) is not None:
                self.ttft_kernel += 1
            self.itl_kernel += max(0, len(times) - 1)
        sampler = self._sampler(record)
        bound = self.bound
        now = time.monotonic() if now is None else now
        shared = _shared_read_bounds(record)
        late = self._first_token_lateness(record, sampler, shared, now)
        if late is not None:
            self.ttft_checked += 1
            if late > bound:
                self.ttft_flagged += 1
            self.ttft_late.add(max(late, bound))
        if len(times) < 2:
            return
        gaps = len(times) - 1
        self.itl_checked += gaps
        if shared is None and sampler.calm(times[0], times[-1], now):  # the common case costs one bisect
            self.itl_late.add(bound, gaps)
            return
        lates = [sampler.lateness(x, now) for x in times]
        if shared is not None:
            lates = [max(a, b) for a, b in zip(lates, shared, strict=True)]
        for a, b in pairwise(lates):
            worst = max(a, b)
            if worst > bound:
                self.itl_flagged += 1
            self.itl_late.add(max(worst, bound))

    # -- the summary that travels -------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """A small plain dict (JSON-safe): this process's loop lag, CPU and flagged timings."""
        end = self.stopped if self.stopped is not None else time.monotonic()
        wall = end - self.started if self.started is not None else None
        cpu = (self._cpu1 if self._cpu1 is not None else time.process_time()) - self._cpu0
        bridge_cpu = None
        if self._bridge_cpu0 is not None:
            now_cpu = self._bridge_cpu1 if self._bridge_cpu1 is not None else _thread_cpu(self._bridge.thread_ident)
            bridge_cpu = None if now_cpu is None else round(now_cpu - self._bridge_cpu0, 4)
        return {
            "pid": os.getpid(),
            "interval_ms": round(self.interval * 1e3, 3),
            "max_loop_lag_ms": round(self.bound * 1e3, 3),
            "wall_s": None if wall is None else round(wall, 4),
            "cpu_s": round(cpu, 4),
            "cpu_pct": None if not wall else round(100 * cpu / wall, 1),
            "bridge_cpu_s": bridge_cpu,
            "hub_lag": self.hub.stats(),
            "bridge_lag": self.bridge.stats(),
            "ttft": {"checked": self.ttft_checked, "flagged": self.ttft_flagged, "kernel": self.ttft_kernel,
                     **_late(self.ttft_late)},
            "itl": {"checked": self.itl_checked, "flagged": self.itl_flagged, "kernel": self.itl_kernel,
                    **_late(self.itl_late)},
            "gc": self.gc.stats(),
        }


TABLE = options.OptionTable("stopstorm self-monitoring", options=(
    options.Option("--max-loop-lag-ms", "an event-loop stall longer than this makes the TTFT/ITL figures taken during "
                   "it flagged as possibly holding this tool's own delay (default 5)", 5.0,
                   options.Number(low=0.0, unit="ms"), float),
    options.Option("--loop-lag-interval-ms", "how often each event loop's lag is sampled, in ms (default 10)", 10.0,
                   options.Number(low=1.0, high=options.MAX_SECONDS * 1e3, unit="ms"), float),
))


def add_arguments(parser: LocustArgumentParser) -> None:
    """The self-monitor's options (shown in the web UI and locust.conf like every stopstorm option)."""
    TABLE.add_arguments(parser)


def _shared_read_bounds(record: Any) -> list[float] | None:
    """`_shared_read_lateness` of a kernel-stamped record's chunks (None for another clock, or no shared stamp).
    Before the first chunk's read: the headers' stamp, unless the same read brought them (then the request's
    write: nothing of the answer came before it)."""
    if getattr(record, "stamp_clock", None) != "kernel":
        return None
    times: Sequence[float] = getattr(record, "chunk_times", None) or []
    headers = getattr(record, "headers", None)
    before = headers if headers is not None and times and headers < times[0] else getattr(record, "written", None)
    return _shared_read_lateness(times, None if before is None else float(before))


def _shared_read_lateness(times: Sequence[float], before: float | None) -> list[float] | None:
    """Per kernel-stamped chunk, the bound of its lateness that a shared stamp proves: chunks that share a stamp
    came in one read, and every one of them but the last (whose segment the stamp is) arrived no earlier than
    the stamp before the read's (`before` for the stream's first read); 0 for the others. None when no two
    chunks share a stamp (the common case)."""
    if not any(a == b for a, b in pairwise(times)):
        return None
    out = [0.0] * len(times)
    for i in range(len(times) - 1):
        if times[i] == times[i + 1]:
            out[i] = times[i] - before if before is not None and before < times[i] else 0.0
        else:
            before = times[i]
    return out


def check_options(opts: Any) -> None:
    """Refuse a bad value, naming its option (each by its rule in TABLE)."""
    TABLE.check(opts)


options.register(TABLE, rank=70)


def from_options(opts: Any) -> SelfMonitor:
    """A monitor from parsed options (checked by `check_options` at init)."""
    return SelfMonitor(float(getattr(opts, "loop_lag_interval_ms", 10.0)) / 1e3,
                       float(getattr(opts, "max_loop_lag_ms", 5.0)) / 1e3)


def process_key(runner: Any) -> str:
    """How the report names this process: `local`, `master`, or `worker <client id>`."""
    kind = type(runner).__name__
    if kind == "WorkerRunner":
        return f"worker {getattr(runner, 'client_id', os.getpid())}"
    return "master" if kind == "MasterRunner" else "local"


# -- the listeners: every process watches its own loops and CPU; a master also keeps its workers' summaries --


@dataclass
class _Monitors:
    own: SelfMonitor | None = None
    key: str = "local"
    workers: dict[str, Any] = field(default_factory=dict)  # on a master: the latest summary of each worker


_MONITORS = _Monitors()


@events.test_start.add_listener
def _start_self_monitor(environment: Any, **_kwargs: Any) -> None:
    """A monitor per run: a later run from the web UI starts from zero, as its records do (its summary must
    not carry the first run's stamps, nor a loop-lag watch that stopped with it)."""
    own = _MONITORS.own
    if own is not None and own.stopped is None:
        return  # this run's (a master may see test_start again)
    _MONITORS.own = from_options(environment.parsed_options).start()
    _MONITORS.key = process_key(environment.runner)
    _MONITORS.workers.clear()  # on a master: the workers' summaries of this run arrive from now on


@events.request.add_listener
def _check_timing(context: dict[str, Any] | None = None, **_kwargs: Any) -> None:
    monitor = _MONITORS.own
    if monitor is not None and context and isinstance(context.get("record"), StreamRecord):
        monitor.check(context["record"])


@events.test_stop.add_listener
def _stop_self_monitor(**_kwargs: Any) -> None:
    if _MONITORS.own is not None:
        _MONITORS.own.stop()


@events.report_to_master.add_listener
def _send_self_monitor(data: dict[str, Any], **_kwargs: Any) -> None:
    monitor = _MONITORS.own
    if monitor is not None:  # cumulative: the master keeps the latest per worker
        data["stopstorm_self_monitor"] = {"key": _MONITORS.key, "summary": monitor.summary()}


@events.worker_report.add_listener
def _receive_self_monitor(client_id: str, data: dict[str, Any], **_kwargs: Any) -> None:
    sent = data.get("stopstorm_self_monitor")
    if isinstance(sent, dict):
        _MONITORS.workers[str(sent.get("key", f"worker {client_id}"))] = sent.get("summary")


def summaries() -> dict[str, Any]:
    """Every process's self-monitor summary, keyed by process: this one's and, on a master, its workers'."""
    out: dict[str, Any] = dict(_MONITORS.workers)
    monitor = _MONITORS.own
    if monitor is not None:
        monitor.stop()
        out[_MONITORS.key] = monitor.summary()
    return out
