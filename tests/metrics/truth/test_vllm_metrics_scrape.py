"""The vLLM `/metrics` reader against real text from the simulator (both vLLM shapes) and hand-written snippets.

Counters are judged against the simulator's ledger (server truth). The scraper's greenlet runs as under Locust:
importing `locust` (first, below) gevent-patches the process.
"""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    # conftest.py imported httpx (and so ssl) before us; a locustfile imports locust first and never sees this.
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (gevent monkey-patches the process, as under Locust)

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import httpx
import pytest
from conftest import FAST, FIXTURES_DIR, wait_until

from stopstorm.metrics.truth.vllm_metrics import (
    ITL_METRIC_NAMES,
    MetricsScraper,
    MetricsSnapshot,
    diff,
    parse_snapshot,
)
from stopstorm.simulator.launcher import EmbeddedSimulator

KEY = ("llm", "0")  # the simulator's labels: --model llm, one engine


@dataclass
class Sim:
    url: str
    flavour: str
    fixture: Path  # the /metrics text saved after the warm-up requests

    def chat(self, max_tokens: int = 5) -> None:
        resp = httpx.post(f"{self.url}/v1/chat/completions", timeout=10,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                                "ignore_eos": True})  # exactly max_tokens, so the counts are known
        resp.raise_for_status()

    def stream(self, max_tokens: int) -> int:
        lines = 0
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=10) as resp:
            for line in resp.iter_lines():
                lines += line.startswith("data:")
        return lines

    def metrics_text(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def ledger(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/stopstorm/ledger", timeout=5).json()["requests"]

    def settled(self) -> MetricsSnapshot:
        """A snapshot taken once every ledger request is freed and the counters agree with the ledger."""
        def check() -> MetricsSnapshot | None:
            entries = self.ledger()
            if any(e["freed"] is None for e in entries):
                return None
            snap = parse_snapshot(self.metrics_text(), time.monotonic())
            gen = snap.engines[KEY].generation_tokens
            return snap if gen == sum(e["generated_tokens"] for e in entries) else None
        return wait_until(check, timeout=10, interval=0.01, what="counters to settle")


def _start(tmp_path_factory: pytest.TempPathFactory, flavour: str) -> Iterator[Sim]:
    args = [*FAST] if flavour == "latest" else [*FAST, "--vllm-flavour", flavour]
    with EmbeddedSimulator(args) as proc:
        assert proc.url is not None
        sim = Sim(proc.url, flavour, tmp_path_factory.mktemp("metrics") / f"vllm-{flavour}.prom")
        for _ in range(3):
            sim.chat()
        sim.settled()
        sim.fixture.write_text(sim.metrics_text())
        yield sim


@pytest.fixture(scope="module")
def sim_latest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    yield from _start(tmp_path_factory, "latest")


@pytest.fixture(scope="module")
def sim_09(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    yield from _start(tmp_path_factory, "0.9")


@pytest.fixture(params=["latest", "0.9"])
def sim(request: pytest.FixtureRequest) -> Sim:
    return request.getfixturevalue("sim_latest" if request.param == "latest" else "sim_09")


# --- hand-written shapes ------------------------------------------------------------------------------------

# vLLM 0.9.x's V0 engine: no `engine` label, two models, the old ITL and KV-cache names.
TEXT_09_TWO_MODELS = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 3.0
vllm:num_requests_running{model_name="b"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 2.0
vllm:num_requests_waiting{model_name="b"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="a"} 0.25
vllm:gpu_cache_usage_perc{model_name="b"} 0.5
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="a"} 120.0
vllm:generation_tokens_total{model_name="b"} 30.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="a"} 50.0
vllm:prompt_tokens_total{model_name="b"} 10.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{finished_reason="stop",model_name="a"} 4.0
vllm:request_success_total{finished_reason="length",model_name="a"} 1.0
vllm:request_success_total{finished_reason="length",model_name="b"} 2.0
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{le="0.01",model_name="a"} 10.0
vllm:time_per_output_token_seconds_bucket{le="0.1",model_name="a"} 100.0
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="a"} 115.0
vllm:time_per_output_token_seconds_count{model_name="a"} 115.0
vllm:time_per_output_token_seconds_sum{model_name="a"} 3.5
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="b"} 2.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="b"} 2.0
vllm:time_to_first_token_seconds_count{model_name="b"} 2.0
vllm:time_to_first_token_seconds_sum{model_name="b"} 0.12
# TYPE http_requests_total counter
http_requests_total{handler="/v1/chat/completions",status="2xx"} 9.0
"""

TEXT_TWO_ENGINES = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 4.0
vllm:num_requests_running{engine="1",model_name="m"} 6.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.1
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.3
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1000.0
vllm:generation_tokens_total{engine="1",model_name="m"} 2000.0
vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 3.0
vllm:num_preemptions_total{engine="1",model_name="m"} 0.0
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.05",model_name="m"} 90.0
vllm:inter_token_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 100.0
vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 100.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} 2.0
vllm:inter_token_latency_seconds_bucket{engine="1",le="0.05",model_name="m"} 5.0
vllm:inter_token_latency_seconds_bucket{engine="1",le="+Inf",model_name="m"} 10.0
vllm:inter_token_latency_seconds_count{engine="1",model_name="m"} 10.0
vllm:inter_token_latency_seconds_sum{engine="1",model_name="m"} 0.5
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_count{engine="0",model_name="m"} 7.0
vllm:time_per_output_token_seconds_sum{engine="0",model_name="m"} 9.0
"""


def _counter_text(gen: float, prompt: float, length: float, itl_counts: tuple[float, float]) -> str:
    below, total = itl_counts
    return f"""\
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",model_name="m"}} {gen}
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="m"}} {prompt}
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="length",model_name="m"}} {length}
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{{engine="0",le="0.05",model_name="m"}} {below}
vllm:inter_token_latency_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {total}
vllm:inter_token_latency_seconds_count{{engine="0",model_name="m"}} {total}
vllm:inter_token_latency_seconds_sum{{engine="0",model_name="m"}} {total / 100}
"""


def test_09_without_engine_label_keys_by_model():
    snap = parse_snapshot(TEXT_09_TWO_MODELS, at=1.0)
    assert set(snap.keys) == {("a", None), ("b", None)}
    a, b = snap.engines[("a", None)], snap.engines[("b", None)]
    assert (a.running, a.waiting, b.running, b.waiting) == (3.0, 2.0, 1.0, 0.0)
    assert (a.kv_cache_usage, a.kv_cache_metric) == (0.25, "vllm:gpu_cache_usage_perc")
    assert (a.generation_tokens, b.generation_tokens, a.prompt_tokens) == (120.0, 30.0, 50.0)
    assert dict(a.success or {}) == {"stop": 4.0, "length": 1.0} and a.success_total == 5.0
    assert dict(b.success or {}) == {"length": 2.0}
    # The 0.9 name normalises to `itl`, and says which name it was.
    assert a.itl is not None and a.itl_metric == "vllm:time_per_output_token_seconds"
    assert a.itl.buckets == ((0.01, 10.0), (0.1, 100.0), (float("inf"), 115.0))
    assert (a.itl.count, a.itl.sum, a.itl.bucket(0.1)) == (115.0, 3.5, 100.0)
    # Missing is None, never 0.
    assert a.preemptions is None and a.ttft is None and a.queue_time is None and a.e2e_latency is None
    assert b.itl is None and b.itl_metric is None and b.ttft is not None and b.ttft.count == 2.0
    assert snap.total("generation_tokens") == 150.0 and snap.total("preemptions") is None


def test_two_engines_are_separate_keys_and_newest_itl_name_wins():
    snap = parse_snapshot(TEXT_TWO_ENGINES, at=0.0)
    assert set(snap.keys) == {("m", "0"), ("m", "1")}
    e0, e1 = snap.engines[("m", "0")], snap.engines[("m", "1")]
    assert (e0.running, e1.running, snap.total("running")) == (4.0, 6.0, 10.0)
    assert (e0.kv_cache_usage, e1.kv_cache_metric) == (0.1, "vllm:kv_cache_usage_perc")
    assert (e0.generation_tokens, e1.generation_tokens) == (1000.0, 2000.0)  # `_created` ignored
    assert (e0.preemptions, e1.preemptions) == (3.0, 0.0)
    assert e0.itl_metric == ITL_METRIC_NAMES[0] and e0.itl is not None and e0.itl.count == 100.0
    assert e1.itl is not None and e1.itl.sum == 0.5
    assert e0.success is None and e0.waiting is None


def test_counter_without_total_suffix_and_unlabelled():
    text = "# TYPE vllm:generation_tokens counter\nvllm:generation_tokens 7\n"
    assert parse_snapshot(text, 0.0).engines[(None, None)].generation_tokens == 7.0


def test_empty_and_foreign_text():
    assert parse_snapshot("", 0.0).engines == {}
    assert parse_snapshot("# TYPE up gauge\nup 1\n", 0.0).engines == {}


def test_counter_reset_gives_the_after_value_and_flags_it():
    before = parse_snapshot(_counter_text(500, 100, 20, (300, 400)), at=10.0)
    after = parse_snapshot(_counter_text(30, 200, 2, (4, 5)), at=12.5)
    delta = diff(before, after)
    d = delta.engines[("m", "0")]
    assert delta.duration == 2.5
    assert d.generation_tokens == 30 and d.prompt_tokens == 100  # reset / plain increase
    assert dict(d.success or {}) == {"length": 2}
    assert d.itl is not None and d.itl.count == 5 and d.itl.bucket(0.05) == 4
    assert d.reset and delta.reset
    assert set(d.resets) == {"generation_tokens", "success[length]", "itl"}
    assert delta.total.generation_tokens == 30 and delta.total.reset


def test_no_reset_plain_window_and_totals_over_keys():
    before = parse_snapshot(TEXT_TWO_ENGINES, at=0.0)
    after = parse_snapshot(TEXT_TWO_ENGINES.replace("} 1000.0", "} 1100.0").replace("} 2000.0", "} 2050.0"), 1.0)
    delta = diff(before, after)
    assert not delta.reset and delta.vanished == ()
    assert delta.engines[("m", "0")].generation_tokens == 100 and delta.engines[("m", "1")].generation_tokens == 50
    assert delta.total.generation_tokens == 150 and delta.total.preemptions == 0
    assert delta.total.itl is not None and delta.total.itl.count == 0 and delta.total.itl.sum == 0
    assert delta.total.success is None and delta.total.prompt_tokens is None  # never exposed: None


def test_key_appearing_and_vanishing():
    one = parse_snapshot(TEXT_09_TWO_MODELS.replace('model_name="b"', 'model_name="c"'), 0.0)
    two = parse_snapshot(TEXT_09_TWO_MODELS, 1.0)
    delta = diff(one, two)
    assert delta.vanished == (("c", None),)
    assert delta.engines[("b", None)].generation_tokens == 30.0  # appeared in the window: counted from 0
    assert delta.engines[("a", None)].generation_tokens == 0.0


# --- real text from the simulator ---------------------------------------------------------------------------


def test_fixture_text_matches_the_ledger(sim: Sim):
    snap = parse_snapshot(sim.fixture.read_text(), at=0.0)
    entries = sim.ledger()
    assert snap.keys == (KEY,)
    m = snap.engines[KEY]
    assert m.generation_tokens == sum(e["generated_tokens"] for e in entries) == 15
    assert m.prompt_tokens == sum(e["prompt_tokens"] for e in entries)
    assert m.success_total == len(entries) == 3
    assert dict(m.success or {})["length"] == 3
    assert m.preemptions == 0 and m.running is not None and m.waiting == 0
    for h in (m.ttft, m.queue_time, m.e2e_latency):
        assert h is not None and h.count == 3 and h.buckets[-1] == (float("inf"), 3)
    assert m.itl is not None and m.itl.count == 3 * 4  # one sample between each pair of tokens
    if sim.flavour == "0.9":
        assert m.itl_metric == "vllm:time_per_output_token_seconds"
    else:
        assert m.itl_metric == "vllm:inter_token_latency_seconds"
    assert m.kv_cache_usage is not None and m.kv_cache_metric == "vllm:kv_cache_usage_perc"


def test_diff_over_a_window_with_requests(sim: Sim):
    before = sim.settled()
    seen = {e["request_id"] for e in sim.ledger()}
    for n in (3, 7, 4):
        sim.chat(max_tokens=n)
    after = sim.settled()
    new = [e for e in sim.ledger() if e["request_id"] not in seen]
    assert len(new) == 3
    delta = diff(before, after)
    d = delta.engines[KEY]
    assert not delta.reset and delta.duration > 0
    assert d.generation_tokens == sum(e["generated_tokens"] for e in new) == 14
    assert d.prompt_tokens == sum(e["prompt_tokens"] for e in new)
    assert d.success_total == 3 and d.ttft is not None and d.ttft.count == 3
    assert d.itl is not None and d.itl.count == 14 - 3 and d.itl_metric in ITL_METRIC_NAMES
    assert d.e2e_latency is not None and d.e2e_latency.sum is not None and d.e2e_latency.sum > 0
    assert delta.total.generation_tokens == 14


# --- the scraper --------------------------------------------------------------------------------------------


def test_scraper_timeline_sees_running_streams(sim_latest: Sim):
    scraper = MetricsScraper(f"{sim_latest.url}/metrics", interval=0.02)
    seen = {e["request_id"] for e in sim_latest.ledger()}
    scraper.start()
    try:
        wait_until(lambda: scraper.latest is not None, timeout=5, what="first scrape")
        streams = [gevent.spawn(sim_latest.stream, 150) for _ in range(4)]
        gevent.joinall(streams, timeout=15, raise_error=True)
        assert all(g.successful() for g in streams)
        sim_latest.settled()
        time.sleep(0.1)
    finally:
        began = time.monotonic()
        scraper.close()
        assert time.monotonic() - began < 1.0
    assert not scraper.alive and scraper.errors == 0 and scraper.scrapes > 10
    line = scraper.timelines[KEY]
    assert max(p.running or 0 for p in line) >= 2  # several streams seen in flight at once
    assert line[-1].running == 0 and line[-1].waiting == 0
    assert all(a.t <= b.t for a, b in zip(line, list(line)[1:], strict=False))
    delta = scraper.delta()
    new = [e for e in sim_latest.ledger() if e["request_id"] not in seen]
    assert delta is not None and delta.total.generation_tokens == sum(e["generated_tokens"] for e in new) == 4 * 150


def test_scraper_counts_errors_on_a_closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scraper = MetricsScraper(f"http://127.0.0.1:{port}/metrics", interval=0.01, timeout=0.5)
    assert scraper.scrape_once() is None and scraper.errors == 1
    scraper.start()
    wait_until(lambda: scraper.errors >= 5, timeout=5, what="errors to rise")
    began = time.monotonic()
    scraper.close()
    assert time.monotonic() - began < 1.0 and not scraper.alive
    assert scraper.first is None and scraper.latest is None and scraper.delta() is None
    assert scraper.last_error is not None and "ConnectionError" in scraper.last_error
    assert scraper.scrapes >= scraper.errors >= 5 and not scraper.timelines


def test_stop_interrupts_a_hung_scrape():
    """A server that accepts and never answers: stop() still returns within a second."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        port = listener.getsockname()[1]
        scraper = MetricsScraper(f"http://127.0.0.1:{port}/metrics", interval=0.01, timeout=30)
        scraper.start()
        time.sleep(0.1)
        began = time.monotonic()
        scraper.stop()
        assert time.monotonic() - began < 1.0 and not scraper.alive
        assert scraper.errors == 0  # killed, not failed
    finally:
        listener.close()


def test_scraper_never_raises_on_unparsable_text():
    class Resp:
        text = "vllm:num_requests_running{model_name=\"a\" 1\n"  # unclosed label set

        def raise_for_status(self) -> None:
            pass

    class Session:
        def get(self, url: str, *, timeout: float) -> Resp:
            return Resp()

    scraper = MetricsScraper("http://unused/metrics", session=Session())
    assert scraper.scrape_once() is None and scraper.errors == 1 and scraper.last_error


# --- the simulator's 0.9 flavour against real vLLM 0.9.2 (tests/fixtures/vllm-0.9-cpu) ----------------------------

REAL_09 = FIXTURES_DIR / "vllm-0.9-cpu" / "metrics-after.txt"


def test_09_flavour_reads_like_real_vllm_092(sim_09: Sim):
    """What the scraper reads from the simulator's 0.9 flavour, it reads the same way from real vLLM 0.9.2:
    the same keys (0.9.2's V1 engine labels `engine`), the same fields present, the same metric names chosen,
    the same success reasons; real 0.9.2 exposes more families, but only ones the scraper does not read."""
    from prometheus_client.parser import text_string_to_metric_families

    real_text, sim_text = REAL_09.read_text(), sim_09.metrics_text()
    real, sim = parse_snapshot(real_text, 0.0), parse_snapshot(sim_text, 0.0)
    assert real.keys == sim.keys == (KEY,)
    r, s = real.engines[KEY], sim.engines[KEY]
    present = ("running", "waiting", "kv_cache_usage", "generation_tokens", "prompt_tokens", "preemptions", "success",
               "ttft", "queue_time", "e2e_latency", "itl")
    assert [getattr(r, f) is not None for f in present] == [getattr(s, f) is not None for f in present]
    assert all(getattr(r, f) is not None for f in present)
    assert (r.itl_metric, r.kv_cache_metric) == (s.itl_metric, s.kv_cache_metric)
    assert set(r.success or {}) == set(s.success or {}) == {"stop", "length", "abort"}

    def families(text: str) -> set[str]:
        return {f.name for f in text_string_to_metric_families(text) if f.name.startswith("vllm:")}

    only_real = families(real_text) - families(sim_text)
    assert all(n.endswith("_created") or "prefix_cache" in n or n == "vllm:cache_config_info" for n in only_real), (
        only_real)
