"""The simulator's /metrics and request log, held against its ledger.

The metrics simulator here is used by this module alone and its ledger is never reset, so every counter must
equal a sum over the whole ledger whenever the engine is idle: an exact check, not a delta that could hide a
miscount made before it.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

import pytest
from conftest import (
    FAST,
    SIM_09,
    RawStream,
    Scrape,
    SimHandle,
    SimPool,
    chat_body,
    completion_body,
    content_tokens,
    wait_until,
)

CHAT = "/v1/chat/completions"
MODEL = "sim-model"
METRICS = (*FAST, "--max-num-seqs", "2", "--output-len", "fixed:5", "--served-model-name", MODEL)
LBL = {"model_name": MODEL, "engine": "0"}
LOG_LINE = re.compile(r"^(?P<level>[A-Z]+) (?P<ts>\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \[(?P<src>[^\]]+)\] (?P<msg>.*)$")
FINISHED = ("stop", "length")


@pytest.fixture(scope="module")
def msim(sim_pool: SimPool) -> SimHandle:
    sim = sim_pool.get(*METRICS)
    sim.wait_idle()
    return sim


def close_after(sim: SimHandle, rid: str, tokens: int, path: str = CHAT, **body: Any) -> None:
    """A stream the client closes once it has `tokens` content chunks; waits until the server dropped it."""
    b = chat_body(500, ignore_eos=True, **body) if path == CHAT else completion_body(500, ignore_eos=True, **body)
    s = RawStream(sim, path, b, rid)
    got = 0
    while got < tokens:
        got += content_tokens(s.read_events(1))
    s.close()
    prefix = "chatcmpl-" if path == CHAT else "cmpl-"
    e = sim.wait_entry(prefix + rid)
    assert e["finish_reason"] == "abort"


def hold_and_close(sim: SimHandle, rids: list[str], queued: list[str]) -> None:
    """Fill every slot with long streams, queue more behind them, then close them all (queued ones first)."""
    streams = []
    for rid in rids:
        streams.append(RawStream(sim, CHAT, chat_body(1000, ignore_eos=True), rid))
        sim.wait_entry(f"chatcmpl-{rid}", until=lambda e: e["first_token"] is not None)
    waiting = []
    for rid in queued:
        waiting.append(RawStream(sim, CHAT, chat_body(1000, ignore_eos=True), rid))
        sim.wait_entry(f"chatcmpl-{rid}", until=lambda e: True)
    for s in [*waiting, *streams]:
        s.close()
    for rid in [*rids, *queued]:
        assert sim.wait_entry(f"chatcmpl-{rid}")["finish_reason"] == "abort"


@pytest.fixture(scope="module")
def workload(msim: SimHandle) -> dict[str, dict[str, Any]]:
    """A mix of every way a request can end; returns the idle ledger."""
    sim = msim
    assert sim.http.post(CHAT, json=chat_body(20, stream=False), headers={"X-Request-Id": "w-stop1"}).status_code == 200
    with RawStream(sim, CHAT, chat_body(20), "w-stop2") as s:
        assert content_tokens(s.read_to_end()) == 5
    with RawStream(sim, CHAT, chat_body(7, ignore_eos=True), "w-len") as s:
        assert content_tokens(s.read_to_end()) == 7
    with RawStream(sim, "/v1/completions", completion_body(3), "w-cmp") as s:
        assert content_tokens(s.read_to_end()) == 3
    close_after(sim, "w-abort1", 3)
    close_after(sim, "w-abort2", 6, path="/v1/completions")
    hold_and_close(sim, ["w-run1", "w-run2"], ["w-queued"])
    with RawStream(sim, CHAT, chat_body(20, ignore_eos=True), "w-fault",
                   headers={"x-stopstorm-fault": "error-after:2"}) as s:
        events = s.read_to_end()
    assert "error" in events[-2]
    entries = sim.wait_idle()
    assert entries["chatcmpl-w-queued"]["first_token"] is None  # the prompt-token rule below matters
    return entries


def finished(entries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries.values() if e["finish_reason"] in FINISHED]


def with_first_token(entries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries.values() if e["first_token"] is not None]


# --- counters against the ledger ------------------------------------------------------------------------------


def test_token_counters_equal_ledger_sums(msim, workload):
    entries = msim.wait_idle()
    m = msim.scrape()
    assert m.value("vllm:generation_tokens_total", **LBL) == sum(e["generated_tokens"] for e in entries.values())
    prompt_seen = sum(e["prompt_tokens"] for e in with_first_token(entries))
    assert m.value("vllm:prompt_tokens_total", **LBL) == prompt_seen
    assert prompt_seen < sum(e["prompt_tokens"] for e in entries.values())
    # Aborted requests' tokens are in the token counters (the waste is measurable) ...
    aborted_tokens = sum(e["generated_tokens"] for e in entries.values() if e["finish_reason"] == "abort")
    assert aborted_tokens > 0
    assert m.value("vllm:generation_tokens_total", **LBL) == aborted_tokens + sum(
        e["generated_tokens"] for e in finished(entries))


def test_request_success_counts_only_normal_finishes(msim, workload):
    entries = msim.wait_idle()
    m = msim.scrape()
    reasons = [e["finish_reason"] for e in entries.values()]
    assert reasons.count("stop") >= 2 and reasons.count("length") >= 2 and reasons.count("abort") >= 5
    for reason in ("stop", "length"):
        assert m.value("vllm:request_success_total", finished_reason=reason, **LBL) == reasons.count(reason)
    # ... but the blind spot: no client-disconnect abort is counted as a finished request.
    assert m.value("vllm:request_success_total", finished_reason="abort", **LBL) == 0
    assert m.value("stopstorm_sim:aborts_total", **LBL) == reasons.count("abort")
    assert m.value("stopstorm_sim:abort_requests_total", **LBL) == reasons.count("abort")


def test_per_request_histograms_cover_finished_requests_only(msim, workload):
    entries = msim.wait_idle()
    m = msim.scrape()
    done = finished(entries)
    n = len(done)
    assert n < len(entries)
    for name in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_inference_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens", "request_params_max_tokens"):
        assert m.value(f"vllm:{name}_count", **LBL) == n, name
    assert m.value("vllm:request_generation_tokens_sum", **LBL) == sum(e["generated_tokens"] for e in done)
    assert m.value("vllm:request_prompt_tokens_sum", **LBL) == sum(e["prompt_tokens"] for e in done)
    assert m.value("vllm:request_params_max_tokens_sum", **LBL) == sum(e["max_tokens"] for e in done)
    # The observed values are the ledger's own intervals.
    assert m.value("vllm:e2e_request_latency_seconds_sum", **LBL) == pytest.approx(
        sum(e["freed"] - e["arrival"] for e in done), abs=1e-6)
    assert m.value("vllm:request_queue_time_seconds_sum", **LBL) == pytest.approx(
        sum(e["scheduled"] - e["arrival"] for e in done), abs=1e-6)
    assert m.value("vllm:request_decode_time_seconds_sum", **LBL) == pytest.approx(
        sum(e["freed"] - e["first_token"] for e in done), abs=1e-6)


def test_ttft_and_itl_histograms_count_tokens_of_every_request(msim, workload):
    entries = msim.wait_idle()
    m = msim.scrape()
    first = with_first_token(entries)
    assert m.value("vllm:time_to_first_token_seconds_count", **LBL) == len(first)
    assert m.value("vllm:time_to_first_token_seconds_sum", **LBL) == pytest.approx(
        sum(e["first_token"] - e["arrival"] for e in first), abs=1e-6)
    assert m.value("vllm:inter_token_latency_seconds_count", **LBL) == sum(
        max(0, e["generated_tokens"] - 1) for e in entries.values())
    # Histogram buckets are cumulative and end at the count.
    buckets = [s for s in m.samples("vllm:time_to_first_token_seconds_bucket")]
    values = [s.value for s in buckets]
    assert values == sorted(values) and buckets[-1].labels["le"] == "+Inf" and values[-1] == len(first)


def test_client_disconnect_aborts_are_invisible_to_per_request_metrics(msim, workload):
    msim.wait_idle()
    before = msim.scrape()
    close_after(msim, "blind1", 4)
    close_after(msim, "blind2", 2)
    entries = msim.wait_idle()
    after = msim.scrape()
    new = [entries["chatcmpl-blind1"], entries["chatcmpl-blind2"]]

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **LBL, **labels) - before.value(name, **LBL, **labels)

    for reason in ("stop", "length", "abort"):
        assert delta("vllm:request_success_total", finished_reason=reason) == 0
    assert delta("vllm:e2e_request_latency_seconds_count") == 0
    assert delta("vllm:request_queue_time_seconds_count") == 0
    assert delta("vllm:generation_tokens_total") == sum(e["generated_tokens"] for e in new) >= 6
    assert delta("vllm:prompt_tokens_total") == sum(e["prompt_tokens"] for e in new)
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert delta("stopstorm_sim:aborts_total") == 2
    # And nothing more is generated for them once they are gone.
    time.sleep(5 * msim.config.step_base_s)
    assert msim.scrape().value("vllm:generation_tokens_total", **LBL) == after.value(
        "vllm:generation_tokens_total", **LBL)


# --- gauges ---------------------------------------------------------------------------------------------------


def gauges(m: Scrape) -> tuple[float, float]:
    return m.value("vllm:num_requests_running", **LBL), m.value("vllm:num_requests_waiting", **LBL)


def test_running_and_waiting_gauges_follow_the_ledger(msim):
    msim.wait_idle()
    assert gauges(msim.scrape()) == (0, 0)
    streams = []
    try:
        for i in range(3):
            streams.append(RawStream(msim, CHAT, chat_body(1000, ignore_eos=True), f"g{i}"))
            msim.wait_entry(f"chatcmpl-g{i}", until=lambda e: True)
        wait_until(lambda: gauges(msim.scrape()) == (2, 1), timeout=5, what="gauges 2 running, 1 waiting")
        entries = [msim.entry(f"chatcmpl-g{i}") for i in range(3)]
        running = [e for e in entries if e and e["scheduled"] is not None and e["freed"] is None]
        waiting = [e for e in entries if e and e["scheduled"] is None and e["freed"] is None]
        assert [e["request_id"] for e in running] == ["chatcmpl-g0", "chatcmpl-g1"]
        assert [e["request_id"] for e in waiting] == ["chatcmpl-g2"]
        kv = msim.scrape().value("vllm:kv_cache_usage_perc", **LBL)
        assert 0 < kv < 1
    finally:
        for s in reversed(streams):
            s.close()
    msim.wait_idle()
    assert gauges(msim.scrape()) == (0, 0)
    assert msim.scrape().value("vllm:kv_cache_usage_perc", **LBL) == 0


def test_0_9_gauges_stay_stale_after_the_last_abort(sim_pool):
    sim = sim_pool.fresh(*SIM_09)
    streams = [RawStream(sim, CHAT, chat_body(1000, ignore_eos=True), f"stale{i}") for i in range(2)]
    for i in range(2):
        sim.wait_entry(f"chatcmpl-stale{i}", until=lambda e: e["generated_tokens"] >= 2)
    lbl = {"model_name": "llm", "engine": "0"}
    assert sim.scrape().value("vllm:num_requests_running", **lbl) == 2
    for s in streams:
        s.close()
    sim.wait_idle()
    # Stale: the last step still ran with an aborted request. Both closes usually land in one step (2), but a
    # step boundary may fall between them, and then one more step ran with the other request alone (1).
    assert sim.scrape().value("vllm:num_requests_running", **lbl) in (1, 2)


# --- names and labels -----------------------------------------------------------------------------------------


def test_every_vllm_sample_carries_model_name_and_engine(msim):
    m = msim.scrape()
    vllm = [f for name, f in m.families.items() if name.startswith("vllm:")]
    assert len(vllm) > 15
    for fam in vllm:
        assert fam.samples, fam.name
        for s in fam.samples:
            assert s.labels["model_name"] == MODEL and s.labels["engine"] == "0", s


def test_latest_flavour_metric_names(msim):
    names = set(msim.scrape().families)
    assert {"vllm:inter_token_latency_seconds", "vllm:request_time_per_output_token_seconds",
            "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds", "vllm:num_requests_running",
            "vllm:num_requests_waiting", "vllm:generation_tokens", "vllm:prompt_tokens",
            "vllm:request_success"} <= names
    assert "vllm:time_per_output_token_seconds" not in names
    assert "vllm:gpu_cache_usage_perc" not in names
    m = msim.scrape()
    assert m.families["vllm:generation_tokens"].type == "counter"
    assert m.families["vllm:num_requests_running"].type == "gauge"
    assert m.families["vllm:time_to_first_token_seconds"].type == "histogram"


def test_0_9_flavour_metric_names(sim_pool):
    sim = sim_pool.get(*SIM_09)
    m = sim.scrape()
    names = set(m.families)
    assert {"vllm:time_per_output_token_seconds", "vllm:gpu_cache_usage_perc"} <= names
    assert "vllm:inter_token_latency_seconds" not in names
    assert m.families["vllm:time_per_output_token_seconds"].type == "histogram"


# --- the request log ------------------------------------------------------------------------------------------


def log_lines(sim: SimHandle) -> list[re.Match[str]]:
    out = []
    for line in sim.log_text().splitlines():
        match = LOG_LINE.match(line)
        if match and "request" in match["msg"].lower():
            out.append(match)
    return out


def log_epoch(ts: str) -> float:
    """A log stamp (`MM-DD HH:MM:SS.mmm`, local time, no year) as Unix time."""
    year = datetime.now().year
    return datetime.strptime(f"{year}-{ts}", "%Y-%m-%d %H:%M:%S.%f").timestamp()


def test_log_added_and_aborted_lines_latest(msim, workload):
    entries = msim.wait_idle()
    offset = msim.ledger()["epoch_offset"]
    lines = log_lines(msim)
    added: dict[str, str] = {}
    aborted: dict[str, list[re.Match[str]]] = {}
    for match in lines:
        assert match["level"] == "INFO"
        if m := re.fullmatch(r"Added request (\S+)-([0-9a-f]{8})\.", match["msg"]):
            added[m[1]] = m[2]
        elif m := re.fullmatch(r"Aborted request\(s\) (\S+)-([0-9a-f]{8})\.", match["msg"]):
            aborted.setdefault(m[1], []).append(match)
            assert added.get(m[1]) == m[2]  # same internal id as when it was added
    assert set(entries) <= set(added)
    for rid, e in entries.items():
        if e["finish_reason"] == "abort":
            assert rid in aborted, rid
            if e["disconnect_seen"] is not None:
                # The line is stamped when the abort was asked for: the moment the close was seen.
                stamp = log_epoch(aborted[rid][0]["ts"])
                assert abs(stamp - (e["disconnect_seen"] + offset)) < 0.05
        else:
            assert rid not in aborted, rid


def test_log_has_each_request_line_once(msim, workload):
    msim.wait_idle()
    msgs = [m["msg"] for m in log_lines(msim)]
    for rid in workload:
        assert sum(1 for msg in msgs if msg.startswith(f"Added request {rid}-")) == 1, rid


def test_log_lines_0_9(sim_pool):
    sim = sim_pool.fresh(*SIM_09)
    assert sim.http.post(CHAT, json=chat_body(3, stream=False), headers={"X-Request-Id": "old-ok"}).status_code == 200
    close_after(sim, "old-gone", 2)
    msgs = [m["msg"] for m in log_lines(sim)]
    assert "Added request chatcmpl-old-ok." in msgs
    assert "Added request chatcmpl-old-gone." in msgs
    i = msgs.index("Aborted request chatcmpl-old-gone.")
    assert msgs[i + 1 :].count("Request chatcmpl-old-gone aborted.") >= 1
    assert not any("old-ok" in msg and "bort" in msg for msg in msgs)
    assert not any(re.search(r"chatcmpl-old-\w+-[0-9a-f]{8}", msg) for msg in msgs)
