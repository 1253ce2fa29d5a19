"""vLLM's `/metrics`, read as server truth: snapshots, window deltas and a background scraper.

The server's own counters say what the engine did, whatever the clients believe they saw. They also have a
blind spot that stopstorm exists to measure: a client-disconnect abort counts in `generation_tokens_total` and
`prompt_tokens_total`, but not in `request_success_total` (not even `finished_reason="abort"`) nor in any
per-request histogram (queue, TTFT, e2e; vLLM issue #55634). So, over a window,

    wasted tokens = Δ generation_tokens_total − tokens the clients received.

Parsing goes through `prometheus_client.parser` only. Metrics are matched by *sample* name, so the parser's
habit of stripping `_total` from counter family names does not matter (a counter sample without `_total` is
given it back). Readings are keyed by `(model_name, engine)`; a server without an `engine` label (vLLM's V0
engine) is keyed with None (0.9.2's V1 engine has it: tests/fixtures/vllm-0.9-cpu).
A metric the server does not expose is None, never 0. Names that changed between versions are normalised to
one field, remembering the name seen: inter-token latency (`inter_token_latency_seconds`, 0.9's
`time_per_output_token_seconds`) and KV-cache usage (`kv_cache_usage_perc`, 0.9's `gpu_cache_usage_perc`); the
newer name wins when a server exposes both.

vLLM 0.9.x's running/waiting gauges can stay stale after the last request is aborted, until new traffic: read
the timeline with that in mind.

`MetricsScraper` polls in a gevent greenlet (the process is expected to be gevent-patched, as under Locust). A
failed scrape never raises: it is counted, its error kept as text, and `scrape_once` returns None, as vLLM's
benchmark client does.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import requests
from prometheus_client.parser import text_string_to_metric_families

from stopstorm.metrics.truth.poller import Poller

__all__ = [
    "ITL_METRIC_NAMES",
    "KV_CACHE_METRIC_NAMES",
    "EngineDelta",
    "EngineMetrics",
    "Histogram",
    "HttpGetter",
    "MetricsDelta",
    "MetricsKey",
    "MetricsScraper",
    "MetricsSnapshot",
    "TimelinePoint",
    "diff",
    "parse_snapshot",
]

MetricsKey = tuple[str | None, str | None]
"""(model_name, engine); either is None when the server does not label its metrics with it."""

# Newest name first: when both are exposed, the first wins.
ITL_METRIC_NAMES = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
KV_CACHE_METRIC_NAMES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")

_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
}
_COUNTERS = {
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:num_preemptions_total": "preemptions",
}
_SUCCESS = "vllm:request_success_total"
_HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": "ttft",
    "vllm:request_queue_time_seconds": "queue_time",
    "vllm:e2e_request_latency_seconds": "e2e_latency",
    **dict.fromkeys(ITL_METRIC_NAMES, "itl"),
}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_COUNTER_FIELDS = ("generation_tokens", "prompt_tokens", "preemptions")
_HISTOGRAM_FIELDS = ("ttft", "queue_time", "e2e_latency", "itl")
_EMPTY: Mapping[Any, Any] = MappingProxyType({})


# --- records -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Histogram:
    """One Prometheus histogram: cumulative bucket counts by upper bound (`inf` last), sum and count."""

    buckets: tuple[tuple[float, float], ...]
    sum: float | None
    count: float | None

    def bucket(self, le: float) -> float | None:
        """The cumulative count at upper bound `le`; None if there is no such bucket."""
        for bound, count in self.buckets:
            if bound == le:
                return count
        return None


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """The readings for one (model_name, engine) at one scrape. None: the server did not expose it."""

    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    kv_cache_metric: str | None = None  # which of KV_CACHE_METRIC_NAMES was read
    generation_tokens: float | None = None
    prompt_tokens: float | None = None
    preemptions: float | None = None
    success: Mapping[str, float] | None = None  # request_success_total by finished_reason
    ttft: Histogram | None = None
    queue_time: Histogram | None = None
    e2e_latency: Histogram | None = None
    itl: Histogram | None = None
    itl_metric: str | None = None  # which of ITL_METRIC_NAMES was read

    @property
    def success_total(self) -> float | None:
        return None if self.success is None else sum(self.success.values())


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Every key's readings at time `at` (the caller's clock; the scraper uses `time.monotonic()`)."""

    at: float
    engines: Mapping[MetricsKey, EngineMetrics]

    @property
    def keys(self) -> tuple[MetricsKey, ...]:
        return tuple(self.engines)

    def total(self, name: str) -> float | None:
        """A gauge or counter field summed over keys; None when no key has it."""
        return _sum_opt(getattr(m, name) for m in self.engines.values())


@dataclass(frozen=True, slots=True)
class EngineDelta:
    """Counter and histogram increases for one key over a window. None: not exposed at the window's end.

    `reset` is True when a counter or histogram went down (the server restarted): that field's delta is then
    its value at the end, and its name is in `resets`.
    """

    generation_tokens: float | None = None
    prompt_tokens: float | None = None
    preemptions: float | None = None
    success: Mapping[str, float] | None = None
    ttft: Histogram | None = None
    queue_time: Histogram | None = None
    e2e_latency: Histogram | None = None
    itl: Histogram | None = None
    itl_metric: str | None = None
    resets: tuple[str, ...] = ()

    @property
    def reset(self) -> bool:
        return bool(self.resets)

    @property
    def success_total(self) -> float | None:
        return None if self.success is None else sum(self.success.values())


@dataclass(frozen=True, slots=True)
class MetricsDelta:
    """What changed between two snapshots, per key and summed over keys (`total`)."""

    start: float
    end: float
    engines: Mapping[MetricsKey, EngineDelta]
    total: EngineDelta
    vanished: tuple[MetricsKey, ...] = ()  # keys in the first snapshot but not the second

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def reset(self) -> bool:
        return self.total.reset


class TimelinePoint(NamedTuple):
    """One scrape's scheduler gauges for one key (`t` from `time.monotonic()`)."""

    t: float
    running: float | None
    waiting: float | None


# --- parsing -------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _HistogramBuilder:
    buckets: dict[float, float] = field(default_factory=dict)
    sum: float | None = None
    count: float | None = None

    def build(self) -> Histogram:
        return Histogram(tuple(sorted(self.buckets.items())), self.sum, self.count)


@dataclass(slots=True)
class _KeyBuilder:
    values: dict[str, float] = field(default_factory=dict)  # gauges and counters, by sample name
    success: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, _HistogramBuilder] = field(default_factory=dict)  # by metric name

    def build(self) -> EngineMetrics:
        kw: dict[str, Any] = {}
        for name, attr in (*_GAUGES.items(), *_COUNTERS.items()):
            kw[attr] = self.values.get(name)
        kv = next((n for n in KV_CACHE_METRIC_NAMES if n in self.values), None)
        if kv is not None:
            kw["kv_cache_usage"], kw["kv_cache_metric"] = self.values[kv], kv
        if self.success:
            kw["success"] = MappingProxyType(dict(self.success))
        for name, attr in _HISTOGRAMS.items():
            if name in self.histograms and kw.get(attr) is None:  # ITL: the newest name wins
                kw[attr] = self.histograms[name].build()
                if attr == "itl":
                    kw["itl_metric"] = name
        return EngineMetrics(**kw)


def _add(target: dict[Any, float], key: Any, value: float) -> None:
    # Samples that differ only in labels we do not key on are summed.
    target[key] = target.get(key, 0.0) + value


def parse_snapshot(text: str, at: float) -> MetricsSnapshot:
    """Parse vLLM's Prometheus text; raises ValueError on text the parser cannot read."""
    builders: dict[MetricsKey, _KeyBuilder] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("vllm:"):
            continue
        for sample in family.samples:
            name = sample.name
            if family.type == "counter" and name == family.name:  # older parsers: counter without `_total`
                name += "_total"
            labels = sample.labels
            key = (labels.get("model_name"), labels.get("engine"))
            if name in _GAUGES or name in _COUNTERS or name in KV_CACHE_METRIC_NAMES:
                kb = builders.setdefault(key, _KeyBuilder())
                if name in KV_CACHE_METRIC_NAMES:  # a fraction: summing across extra labels would be wrong
                    kb.values[name] = max(kb.values.get(name, 0.0), sample.value)
                else:
                    _add(kb.values, name, sample.value)
            elif name == _SUCCESS:
                _add(builders.setdefault(key, _KeyBuilder()).success, labels.get("finished_reason", ""),
                     sample.value)
            else:
                base, suffix = _split_histogram_sample(name)
                if base is None:
                    continue
                hb = builders.setdefault(key, _KeyBuilder()).histograms.setdefault(base, _HistogramBuilder())
                if suffix == "_bucket":
                    if "le" in labels:
                        _add(hb.buckets, float(labels["le"]), sample.value)
                elif suffix == "_sum":
                    hb.sum = (hb.sum or 0.0) + sample.value
                else:
                    hb.count = (hb.count or 0.0) + sample.value
    return MetricsSnapshot(at, MappingProxyType({k: b.build() for k, b in builders.items()}))


def _split_histogram_sample(name: str) -> tuple[str | None, str]:
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in _HISTOGRAMS:
            return name[: -len(suffix)], suffix
    return None, ""


# --- deltas --------------------------------------------------------------------------------------------------


def _sum_opt(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _counter_delta(before: float | None, after: float | None) -> tuple[float | None, bool]:
    if after is None:
        return None, False
    if before is None:  # appeared during the window: counted from zero
        return after, False
    if after < before:
        return after, True
    return after - before, False


def _histogram_delta(before: Histogram | None, after: Histogram | None) -> tuple[Histogram | None, bool]:
    if after is None:
        return None, False
    if before is None:
        return after, False
    old = dict(before.buckets)
    went_down = (
        (after.count is not None and before.count is not None and after.count < before.count)
        or any(count < old.get(le, 0.0) for le, count in after.buckets)
    )
    if went_down:
        return after, True
    buckets = tuple((le, count - old.get(le, 0.0)) for le, count in after.buckets)
    # The counts decide a reset; a float sum is simply subtracted.
    s = None if after.sum is None else after.sum - (before.sum or 0.0)
    c = None if after.count is None else after.count - (before.count or 0.0)
    return Histogram(buckets, s, c), False


def _engine_delta(before: EngineMetrics | None, after: EngineMetrics) -> EngineDelta:
    before = before or EngineMetrics()
    kw: dict[str, Any] = {"itl_metric": after.itl_metric}
    resets: list[str] = []
    for name in _COUNTER_FIELDS:
        kw[name], reset = _counter_delta(getattr(before, name), getattr(after, name))
        if reset:
            resets.append(name)
    if after.success is not None:
        old = before.success or _EMPTY
        success: dict[str, float] = {}
        for reason, value in after.success.items():
            d, reset = _counter_delta(old.get(reason), value)
            success[reason] = value if d is None else d
            if reset:
                resets.append(f"success[{reason}]")
        kw["success"] = MappingProxyType(success)
    for name in _HISTOGRAM_FIELDS:
        b = getattr(before, name)
        if name == "itl" and before.itl_metric != after.itl_metric:
            b = None  # the server changed versions between the scrapes: not comparable
        kw[name], reset = _histogram_delta(b, getattr(after, name))
        if reset:
            resets.append(name)
    return EngineDelta(**kw, resets=tuple(resets))


def _merge_histograms(hists: list[Histogram]) -> Histogram | None:
    if not hists:
        return None
    buckets: dict[float, float] = {}
    for h in hists:
        for le, count in h.buckets:
            _add(buckets, le, count)
    return Histogram(tuple(sorted(buckets.items())), _sum_opt(h.sum for h in hists),
                     _sum_opt(h.count for h in hists))


def _total(deltas: Iterable[tuple[MetricsKey, EngineDelta]]) -> EngineDelta:
    items = list(deltas)
    kw: dict[str, Any] = {}
    for name in _COUNTER_FIELDS:
        kw[name] = _sum_opt(getattr(d, name) for _, d in items)
    successes = [d.success for _, d in items if d.success is not None]
    if successes:
        merged: dict[str, float] = {}
        for s in successes:
            for reason, value in s.items():
                _add(merged, reason, value)
        kw["success"] = MappingProxyType(merged)
    for name in _HISTOGRAM_FIELDS:
        kw[name] = _merge_histograms([h for _, d in items if (h := getattr(d, name)) is not None])
    kw["itl_metric"] = next((d.itl_metric for _, d in items if d.itl_metric is not None), None)
    resets = tuple(f"{key}:{r}" for key, d in items for r in d.resets)
    return EngineDelta(**kw, resets=resets)


def diff(before: MetricsSnapshot, after: MetricsSnapshot) -> MetricsDelta:
    """Counter and histogram increases from `before` to `after`, per key and in total; gauges are not diffed."""
    engines = {key: _engine_delta(before.engines.get(key), m) for key, m in after.engines.items()}
    vanished = tuple(key for key in before.engines if key not in after.engines)
    return MetricsDelta(before.at, after.at, MappingProxyType(engines), _total(engines.items()), vanished)


# --- the scraper ---------------------------------------------------------------------------------------------


class _Response(Protocol):
    text: str

    def raise_for_status(self) -> Any: ...


class HttpGetter(Protocol):
    """What the scraper needs of a session: `requests.Session` and `httpx.Client` both fit."""

    def get(self, url: str, *, timeout: float) -> _Response: ...


class MetricsScraper(Poller):
    """Polls a vLLM `/metrics` URL every `interval` seconds in a gevent greenlet.

    Keeps the first and the latest good snapshot, a count of scrapes and of failures with the last few error
    texts, and per key a bounded timeline of the running/waiting gauges. Never raises from a scrape.
    """

    what = "scraper"

    def __init__(self, url: str, interval: float = 0.25, timeout: float = 2.0, session: HttpGetter | None = None,
                 timeline_maxlen: int = 100_000, errors_maxlen: int = 100) -> None:
        self.url = url
        self.interval = interval
        self.timeout = timeout
        self._own_session = session is None
        self.session: HttpGetter = session if session is not None else requests.Session()  # type: ignore[assignment]
        self.timeline_maxlen = timeline_maxlen
        self.first: MetricsSnapshot | None = None
        self.latest: MetricsSnapshot | None = None
        self.scrapes = 0  # attempts, good or not
        self.errors = 0
        self.last_error: str | None = None
        self.error_log: deque[tuple[float, str]] = deque(maxlen=errors_maxlen)  # (monotonic time, error)
        self.timelines: dict[MetricsKey, deque[TimelinePoint]] = {}
        super().__init__()

    def scrape_once(self) -> MetricsSnapshot | None:
        """One scrape: the snapshot, or None (counted, error kept) when it failed."""
        self.scrapes += 1
        try:
            resp = self.session.get(self.url, timeout=self.timeout)
            at = time.monotonic()
            resp.raise_for_status()
            snap = parse_snapshot(resp.text, at)
        except Exception as exc:  # a failed scrape is data, not a crash
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.error_log.append((time.monotonic(), self.last_error))
            return None
        if self.first is None:
            self.first = snap
        self.latest = snap
        for key, m in snap.engines.items():
            if m.running is None and m.waiting is None:
                continue
            line = self.timelines.get(key)
            if line is None:
                line = self.timelines[key] = deque(maxlen=self.timeline_maxlen)
            line.append(TimelinePoint(at, m.running, m.waiting))
        return snap

    def delta(self) -> MetricsDelta | None:
        """From the first good snapshot to the latest; None until there is one."""
        if self.first is None or self.latest is None:
            return None
        return diff(self.first, self.latest)

    def read_once(self) -> None:
        self.scrape_once()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop polling; a scrape in flight is killed if it does not end within half of `timeout`."""
        self.halt(timeout)

    def close(self) -> None:
        """Stop, and close the session if the scraper made it."""
        self.stop()
        if self._own_session:
            close = getattr(self.session, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> MetricsScraper:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
