"""The early-stop fixtures (tests/fixtures/vllm-0.32-cpu-early-stop/) say what their README says they say.

Why: a log classifier will be tested against these files; this pins the ground truth it will be held to (the
verdicts in clients.json) to the log lines themselves, read with the repro's plain parser, so a fixture that
was edited or re-recorded inconsistently fails here rather than in the classifier's tests.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import FIXTURES_DIR

from scripts.repro_missed_close import parse_log

FIXTURE = FIXTURES_DIR / "vllm-0.32-cpu-early-stop"
VARIANTS = ("log-requests", "log-outputs")


def _load(variant: str) -> tuple[str, dict]:
    folder = FIXTURE / variant
    return (folder / "server.log").read_text(), json.loads((folder / "clients.json").read_text())


@pytest.mark.parametrize("variant", VARIANTS)
def test_verdicts_follow_the_log(variant):
    text, doc = _load(variant)
    log = parse_log(text)
    clients = doc["clients"]
    assert Counter(c["verdict"] for c in clients) == {"never-registered": 6, "aborted": 18, "ran-on": 4,
                                                      "finished": 2}
    for c in clients:
        rid = c["vllm_request_id"]
        if c["verdict"] == "never-registered":
            assert rid not in text  # not one line names it
        else:
            assert rid in log.added
            assert (rid in log.aborted) == (c["verdict"] == "aborted")
        assert c["closed_early"] == (c["verdict"] != "finished")
    assert text.count('"POST /v1/chat/completions HTTP/1.1" 200') == 24  # none for the 6 never registered


def test_ran_on_streams_are_complete_in_the_output_log():
    text, doc = _load("log-outputs")
    log = parse_log(text)
    for c in doc["clients"]:
        rid = c["vllm_request_id"]
        if c["verdict"] in ("ran-on", "finished"):
            assert rid in log.complete and log.deltas[rid] >= 14 and c["deltas_logged"] == log.deltas[rid]
        else:
            assert rid not in log.complete
    assert not any(c["tokens_read"] for c in doc["clients"] if c["verdict"] == "ran-on")


@pytest.mark.parametrize("variant", VARIANTS)
def test_generated_tokens_add_up(variant):
    _, doc = _load(variant)
    full = sum(16 for c in doc["clients"] if c["verdict"] in ("ran-on", "finished"))
    aborted_read = sum(c["tokens_read"] for c in doc["clients"] if c["verdict"] == "aborted")
    # The aborted streams generated what their clients read, plus at most the token of the step an abort lands in.
    assert full + aborted_read <= doc["generation_tokens_total_delta"] <= full + aborted_read + 2
