"""vLLM's /metrics, reproduced name for name, with vLLM's accounting and its blind spot.

Counts follow vLLM V1's `IterationStats`/`PrometheusStatLogger`: prompt tokens count when a prompt's first
token is sampled, generation tokens as they are produced, TTFT at the first token, inter-token latency per
token; `request_success_total` and the per-request histograms only for requests that finish (stop/length).
A client-disconnect abort therefore shows in the token counters but in no per-request metric: vLLM's blind
spot (issue vllm#55634), which stopstorm must see through and so must reproduce.

Histograms are kept as plain bucket arrays and exposed through a `prometheus_client` collector at scrape
time: one `observe` per token through prometheus_client's locked objects would cost the engine more than the
tokens themselves at tens of thousands per second.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from stopstorm.simulator.config import SimulatorConfig
    from stopstorm.simulator.engine import EngineLoop, Sequence, StepPlan

__all__ = ["VllmMetrics", "build_1_2_5_buckets"]

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0]
_REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                            120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
_ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
_FINISH_REASONS = ("stop", "length", "abort")


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, … up to max_value."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return out
            out.append(value)
        exponent += 1


class _Histogram:
    """Bucket counts without locks; `le` semantics as Prometheus (a value on a bound falls in that bucket)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def family(self, name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=["model_name", "engine"])
        cumulative, running = [], 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else _fmt(bound), running))
        fam.add_metric(labels, cumulative, self.sum)
        return fam


def _fmt(value: float) -> str:
    return repr(float(value))


class VllmMetrics:
    """Engine observer that keeps vLLM's counters and serves them as Prometheus text."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.legacy = config.vllm_flavour == "0.9"
        self.labels = [config.model, "0"]
        self.engine_loop: EngineLoop | None = None
        self.running_now = self.waiting_now = 0
        self.running_shown = self.waiting_shown = 0
        self.kv_tokens = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(_FINISH_REASONS, 0)
        self.abort_requests = 0
        self.aborts = 0
        token_buckets = build_1_2_5_buckets(config.max_model_len)
        self.h_ttft = _Histogram(_TTFT_BUCKETS)
        self.h_itl = _Histogram(_ITL_BUCKETS)
        self.h_tpot_request = _Histogram(_ITL_BUCKETS)
        self.h_e2e = _Histogram(_REQUEST_LATENCY_BUCKETS)
        self.h_queue = _Histogram(_REQUEST_LATENCY_BUCKETS)
        self.h_inference = _Histogram(_REQUEST_LATENCY_BUCKETS)
        self.h_prefill = _Histogram(_REQUEST_LATENCY_BUCKETS)
        self.h_decode = _Histogram(_REQUEST_LATENCY_BUCKETS)
        self.h_prompt_tokens = _Histogram(token_buckets)
        self.h_generation_tokens = _Histogram(token_buckets)
        self.h_max_generation_tokens = _Histogram(token_buckets)
        self.h_max_tokens = _Histogram(token_buckets)
        self.h_n = _Histogram([1, 2, 5, 10, 20])
        self.h_iteration_tokens = _Histogram(_ITERATION_TOKEN_BUCKETS)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- engine observer --------------------------------------------------------------------------------

    def on_added(self, seq: Sequence, now: float) -> None:
        pass

    def on_abort_requested(self, seq: Sequence, now: float) -> None:
        self.abort_requests += 1

    def on_first_token(self, seq: Sequence, now: float) -> None:
        entry = seq.entry
        self.prompt_tokens += entry.prompt_tokens
        self.h_ttft.observe(now - entry.arrival)
        self.h_n.observe(1)
        self.h_max_generation_tokens.observe(entry.max_tokens)

    def on_step(self, plan: StepPlan, now: float, tokens: int, itl_samples: list[float]) -> None:
        self.generation_tokens += tokens
        self.h_iteration_tokens.observe(plan.prefill_tokens + tokens)
        observe = self.h_itl.observe
        for sample in itl_samples:
            observe(sample)
        if self.legacy:  # vLLM 0.9 publishes scheduler state only from steps: gauges go stale when idle
            self.running_shown, self.waiting_shown = self.running_now, self.waiting_now

    def on_finished(self, seq: Sequence, now: float) -> None:
        e = seq.entry
        assert e.scheduled is not None and e.first_token is not None and e.finish_reason is not None
        self.success[e.finish_reason] += 1
        self.h_e2e.observe(now - e.arrival)
        self.h_queue.observe(e.scheduled - e.arrival)
        self.h_inference.observe(now - e.scheduled)
        self.h_prefill.observe(e.first_token - e.scheduled)
        decode = now - e.first_token
        self.h_decode.observe(decode)
        if e.generated_tokens > 1:
            self.h_tpot_request.observe(decode / (e.generated_tokens - 1))
        self.h_prompt_tokens.observe(e.prompt_tokens)
        self.h_generation_tokens.observe(e.generated_tokens)
        self.h_max_tokens.observe(e.max_tokens)

    def on_aborted(self, seq: Sequence, now: float) -> None:
        self.aborts += 1  # vLLM counts a client-disconnect abort in no per-request metric

    def on_queue_change(self, running: int, waiting: int) -> None:
        self.running_now, self.waiting_now = running, waiting
        if not self.legacy:
            self.running_shown, self.waiting_shown = running, waiting

    # -- exposition -------------------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        labels = self.labels
        names = ["model_name", "engine"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(name, doc, labels=names)
            fam.add_metric(labels, value)
            return fam

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            fam = CounterMetricFamily(name, doc, labels=names)
            fam.add_metric(labels, value)
            return fam

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    self.running_shown)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    self.waiting_shown)
        kv = 0.0
        if self.engine_loop is not None:
            held = sum(s.entry.prompt_tokens + s.entry.generated_tokens for s in self.engine_loop.scheduler.running)
            kv = min(1.0, held / (self.config.max_num_seqs * self.config.max_model_len))
        if self.legacy:
            yield gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.", kv)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv)
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", 0)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", self.generation_tokens)
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=[*names, "finished_reason"])
        for reason, count in self.success.items():
            success.add_metric([*labels, reason], count)
        yield success
        hist = [
            ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", self.h_prompt_tokens),
            ("vllm:request_generation_tokens", "Number of generation tokens processed.", self.h_generation_tokens),
            ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
             self.h_iteration_tokens),
            ("vllm:request_max_num_generation_tokens",
             "Histogram of maximum number of requested generation tokens.", self.h_max_generation_tokens),
            ("vllm:request_params_n", "Histogram of the n request parameter.", self.h_n),
            ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", self.h_max_tokens),
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.h_ttft),
        ]
        if self.legacy:
            hist.append(("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                         self.h_itl))
        else:
            hist.append(("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                         self.h_itl))
            hist.append(("vllm:request_time_per_output_token_seconds",
                         "Histogram of time_per_output_token_seconds per request.", self.h_tpot_request))
        hist += [
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.h_e2e),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
             self.h_queue),
            ("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
             self.h_inference),
            ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
             self.h_prefill),
            ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
             self.h_decode),
        ]
        for name, doc, h in hist:
            yield h.family(name, doc, labels)
        yield from self._own_metrics()

    def _own_metrics(self) -> Iterator[Metric]:
        """The simulator's own figures, under a prefix of their own so nobody mistakes them for vLLM's."""
        loop = self.engine_loop
        stats = loop.stats() if loop is not None else {}
        own = [
            ("stopstorm_sim:abort_requests", "Aborts asked for while the request was in flight (client "
             "disconnect, or a simulated engine error).", self.abort_requests),
            ("stopstorm_sim:aborts", "Requests aborted at a step boundary after a client disconnect.",
             self.aborts),
            ("stopstorm_sim:engine_steps", "Engine steps run.", stats.get("steps", 0)),
            ("stopstorm_sim:step_modelled_seconds", "Sum of the step-time model's durations.",
             stats.get("modelled_s", 0.0)),
            ("stopstorm_sim:step_lag_seconds", "Sum of how late steps ended against the step-time model.",
             stats.get("lag_s", 0.0)),
            ("stopstorm_sim:steps_behind_schedule", "Steps that ended later than the model by more than the "
             "tolerance: the simulator's CPU was saturated.", stats.get("steps_behind", 0)),
        ]
        for name, doc, value in own:
            fam = CounterMetricFamily(name, doc, labels=["model_name", "engine"])
            fam.add_metric(self.labels, value)
            yield fam
