"""Server profiles against each server's own output or source (tests/fixtures/<server>/README.txt says which):
vLLM in its three shapes (0.9.x recorded, 0.32 recorded, 0.33 the same names as 0.32 by its source), SGLang,
llama.cpp's llama-server (its /metrics, /slots and log), llama-cpp-python's and TensorRT-LLM's log lines."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES_DIR

from stopstorm.metrics.truth import server_profiles as sp


def _text(*parts: str) -> str:
    return FIXTURES_DIR.joinpath(*parts).read_text(encoding="utf-8")


# --- vLLM: three shapes ---------------------------------------------------------------------------------------


def test_vllm_0_9_recorded_output_is_detected_as_0_9() -> None:
    text = _text("vllm-0.9-cpu", "metrics-after.txt")
    prof = sp.detect(text)
    assert prof is sp.PROFILES["vllm-0.9"]
    r = sp.read(text, prof)
    # vllm-0.9-cpu/README.txt: one stream still running at the scrape, none waiting.
    assert (r.running, r.waiting) == (1.0, 0.0)
    assert r.success is not None and r.success["length"] == 1.0 and r.success["abort"] == 0.0
    assert r.aborted is None  # no counter that counts client disconnects
    assert r.resident_memory_bytes == pytest.approx(1.006690304e9)


def test_vllm_0_32_recorded_output_counts_the_tokens_but_not_the_disconnect_aborts() -> None:
    before, after = (_text("vllm-0.32-cpu", f"metrics-{w}.txt") for w in ("before", "after"))
    prof = sp.detect(after)
    assert prof is sp.PROFILES["vllm"]
    b, a = sp.read(before, prof), sp.read(after, prof)
    # vllm-0.32-cpu/README.txt: Δ generation 77, Δ prompt 27, two client-disconnect aborts, counted nowhere.
    assert a.generation_tokens is not None and b.generation_tokens is not None
    assert a.generation_tokens - b.generation_tokens == 77
    assert a.prompt_tokens is not None and b.prompt_tokens is not None
    assert a.prompt_tokens - b.prompt_tokens == 27
    assert (a.running, a.waiting) == (0.0, 0.0)
    assert sp.abort_counted(b, a, disconnect_aborts=2) is False  # the blind spot, read off the server
    assert a.resident_memory_bytes == pytest.approx(6.45029888e8)


def test_vllm_0_33_has_0_32_names_by_its_source() -> None:
    """0.33 has no recording: its metric names file is byte-identical to 0.32's (vllm-0.33/README.txt), so the
    0.32 recording stands for it. The README's checksum is the one this test relies on."""
    readme = _text("vllm-0.33", "README.txt")
    assert "a17291f044251f1586457b6bd1542f98660724dd07a426d61ce852186b95b9e1" in readme
    assert sp.detect(_text("vllm-0.32-cpu", "metrics-after.txt")) is sp.PROFILES["vllm"]
    assert "0.33" in sp.PROFILES["vllm"].title


def test_vllm_log_lines_confirm_aborts() -> None:
    prof = sp.PROFILES["vllm"]
    lines = [ln for ln in _text("vllm-0.32-cpu", "server.log").splitlines() if "borted" in ln]
    found = [m.request_id for ln in lines if (m := sp.match_abort(prof, ln)) is not None]
    assert "chatcmpl-fix-cut-5-85ec612d" in found and "chatcmpl-fix-cut-5" in found
    assert sp.match_abort(prof, "INFO Added request chatcmpl-x-12345678.") is None


# --- SGLang ---------------------------------------------------------------------------------------------------


def test_sglang_docs_example_is_read_and_a_missing_abort_counter_is_none() -> None:
    text = _text("sglang", "docs-example-excerpt.txt")
    prof = sp.detect(text)
    assert prof is sp.PROFILES["sglang"]
    r = sp.read(text, prof)
    assert (r.running, r.waiting) == (162.0, 2826.0)
    assert (r.generation_tokens, r.prompt_tokens) == (7557572.0, 8128902.0)
    assert r.aborted is None  # that SGLang had no num_aborted_requests_total: None, never 0


def test_sglang_collector_names_give_its_abort_counter() -> None:
    text = _text("sglang", "collector-metrics.txt")
    r = sp.read(text, sp.detect(text) or sp.profile("sglang"))
    assert (r.running, r.waiting, r.generation_tokens, r.prompt_tokens, r.aborted) == (2, 5, 15230, 3600, 3)
    assert sp.PROFILES["sglang"].counts_aborts
    before = sp.ServerReading(at=0.0, aborted=1.0)
    assert sp.abort_counted(before, r, disconnect_aborts=2) is True
    assert sp.abort_counted(before, r, disconnect_aborts=3) is False


# --- llama.cpp llama-server -----------------------------------------------------------------------------------


def test_llama_cpp_metrics_slots_and_log() -> None:
    text = _text("llama.cpp", "metrics.txt")
    prof = sp.detect(text)
    assert prof is sp.PROFILES["llama.cpp"]
    r = sp.read(text, prof)
    assert (r.running, r.waiting, r.generation_tokens, r.prompt_tokens, r.aborted) == (1, 0, 431, 36, None)
    slots = sp.parse_slots(json.loads(_text("llama.cpp", "slots.json")))
    assert slots == (sp.SlotState(0, True, 7, 20, 180), sp.SlotState(1, False))
    lines = _text("llama.cpp", "server-log.txt").splitlines()
    assert [sp.match_abort(prof, ln) for ln in lines] == [None, sp.AbortLine("7", None), None]


def test_parse_slots_refuses_what_is_not_slots() -> None:
    with pytest.raises(ValueError, match="list of slots"):
        sp.parse_slots({"error": "slots endpoint disabled"})
    with pytest.raises(ValueError, match="without id"):
        sp.parse_slots([{"n_ctx": 1}])


# --- servers without counters of their own --------------------------------------------------------------------


def test_trtllm_log_line_names_the_client_and_the_executor_id() -> None:
    line = _text("trtllm", "server-log.txt").strip()
    assert sp.match_abort(sp.profile("trtllm"), line) == sp.AbortLine("2", ("127.0.0.1", 60652))


def test_llama_cpp_python_log_line_names_the_client() -> None:
    prof = sp.profile("llama-cpp-python")
    assert not prof.has_metrics
    line = "Disconnected from client (via refresh/close) Address(host='127.0.0.1', port=41234)"
    assert sp.match_abort(prof, line) == sp.AbortLine(None, ("127.0.0.1", 41234))
    assert sp.match_abort(prof, "disconnected") is None


def test_text_of_no_known_server_is_no_profile_and_unknown_kinds_list_the_valid_ones() -> None:
    assert sp.detect("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.0\n") is None
    with pytest.raises(ValueError, match=r"choose from vllm, vllm-0\.9, sglang"):
        sp.profile("tgi")


def test_every_profile_names_its_source_and_what_its_counters_miss() -> None:
    for prof in sp.PROFILES.values():
        assert prof.source and prof.blind_spot, prof.kind
        assert prof.has_metrics == bool(prof.prefix), prof.kind

