"""A server that misbehaves on purpose (tests/hostile_server.py, raw sockets, 50 ways), read by every client
stack: each behaviour gets one verdict and one message on all six stacks, every token a failing stream did
receive is counted no higher than the server sent, the API key the server echoes is never in a record, and the
streams stopstorm recorded are exactly the requests the server received (none lost, none counted twice).

Single streams go through the users' own path (users/single.py); one real Locust run against the whole mix
checks the same at the scale of a run (records, report, Locust's table, exit code, no traceback).
"""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (gevent monkey-patches the process, as under Locust)

import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT
from locust_tools import records, run_locust
from stream_tools import Streams, make_settings

from stopstorm.metrics.record import INTERRUPTED, StreamRecord
from stopstorm.users.policy import StopPlan
from stopstorm.users.stacks import STACKS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hostile_server

MAX_TOKENS = 8
TIMEOUT_S = 0.6  # --read-timeout and --headers-timeout of these streams
# A whole run's: long enough that a client never gives up before this busy test server has read its request
# (the server can only count what it read; a stream it never read is still recorded, as a timeout).
RUN_TIMEOUT_S = 3.0
KEY = "sk-hostile-0123456789abcdef"
N = hostile_server.TOKENS


@dataclass(frozen=True)
class Verdict:
    error: str | None  # regex the error must match (None: the stream succeeds)
    tokens: int  # tokens the server sent (a success must count exactly these; a failure at most these)
    done: bool = False


OK = Verdict(None, N, done=True)
CUT = r"^stream cut off: the server closed it before data: \[DONE\] "
BROKEN = r"^stream cut off: connection broken mid-stream \("
NOT_STREAM = r"^not an event stream: HTTP 200 with "

VERDICTS: dict[str, Verdict] = {
    # valid SSE, every shape: read to [DONE], every token counted
    "ok": OK, "crlf": OK, "cr": OK, "no-space": OK, "comments": OK, "multiline-data": OK, "bom": OK,
    "split-writes": OK, "utf8-split": OK, "fields": OK, "done-no-blank": OK, "done-one-newline": OK,
    "usage": Verdict(None, 2 * N, done=True), "no-delta": OK, "invalid-utf8": OK, "chunked": OK, "http10": OK,
    "keepalive-after-done": OK, "done-then-garbage": OK, "long-line": OK,
    # broken content
    "error-event": Verdict(r"^server error mid-stream: boom: the engine died$", 2),
    "not-json": Verdict(r"^malformed stream: JSONDecodeError \(not JSON\): '\{this is not json'$", 2),
    "no-choices": Verdict(r"""^malformed stream: chunk without choices: '\{"object":"chat.completion.chunk"\}'$""", 2),
    "json-array": Verdict(r"^malformed stream: chunk is not a JSON object: '\[1, 2, 3\]'$", 2),
    "json-null": Verdict(r"^malformed stream: chunk is not a JSON object: 'null'$", 2),
    # cuts and resets
    "cut-clean": Verdict(CUT + r"\(after 4 events, 3 tokens\)$", 3),
    "cut-chunked": Verdict(BROKEN, 3),
    "cut-content-length": Verdict(BROKEN, 3),
    "reset-mid": Verdict(BROKEN, 3),
    "final-event-no-blank": Verdict(CUT + rf"\(after {N + 1} events, {N} tokens\)$", N),
    "close-before-headers": Verdict(r"^connection error: ", 0),
    "reset-before-headers": Verdict(r"^connection error: ", 0),
    "garbage-status": Verdict(r"^connection error: ", 0),
    # silences
    "silent": Verdict(rf"^timeout: no response headers within {TIMEOUT_S:g} s$", 0),
    "stall-after-headers": Verdict(rf"^timeout: no byte for {TIMEOUT_S:g} s \(", 0),
    "stall-mid": Verdict(rf"^timeout: no byte for {TIMEOUT_S:g} s \(", 2),
    # status codes
    "status-400": Verdict(r"^HTTP 400: max_tokens is too large$", 0),
    "status-401-echo-key": Verdict(r"^HTTP 401: Incorrect API key provided: Bearer \*\*\*\. Your key: \*\*\*$", 0),
    "status-429": Verdict(r"^HTTP 429: rate limited$", 0),
    "status-500-html": Verdict(r"^HTTP 500: <html><body><h1>500 Internal Server Error</h1></body></html>$", 0),
    "status-503-empty": Verdict(r"^HTTP 503: \(empty body\)$", 0),
    "status-204": Verdict(r"^HTTP 204: not an event stream \(expected 200 with Content-Type text/event-stream\)$", 0),
    "redirect-307": Verdict(r"^HTTP 307 redirect to /elsewhere/v1/chat/completions: not followed ", 0),
    # content types and encodings
    "html-200": Verdict(NOT_STREAM + r"Content-Type text/html; charset=utf-8 \(expected text/event-stream\)$", 0),
    "json-200": Verdict(NOT_STREAM + r"Content-Type application/json \(", 0),
    "empty-200": Verdict(NOT_STREAM + r"no Content-Type \(", 0),
    "empty-sse": Verdict(CUT + r"\(no event at all\)$", 0),
    "gzip": Verdict(r"^unrequested Content-Encoding gzip: the request asked for identity", 0),
    # runaway and flooding: stopped, not read for ever
    "runaway": Verdict(rf"^server ignored max_tokens: {2 * MAX_TOKENS + 1} tokens read against max_tokens "
                       rf"{MAX_TOKENS} \(stopped reading past 2 × max_tokens\)$", 2 * MAX_TOKENS + 1),
    "flood-empty": Verdict(rf"^server ignored max_tokens: {2 * MAX_TOKENS + 64 + 1} events read against "
                           rf"max_tokens {MAX_TOKENS} ", 0),
}


def test_every_behaviour_has_a_verdict_and_there_are_at_least_30():
    assert set(VERDICTS) == set(hostile_server.BEHAVIOURS)
    assert len(VERDICTS) >= 30


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hostile_server.py")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("hostile server listening on "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(10)


def received(url: str) -> list[tuple[str, str]]:
    return [tuple(x) for x in httpx.get(f"{url}/_received", timeout=10).json()]  # type: ignore[misc]


@pytest.fixture(scope="module")
def streams() -> Iterator[Streams]:
    s = Streams()
    yield s
    s.close()


RUNS: list[tuple[str, StreamRecord]] = []  # every stream these tests ran: (behaviour, record)


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("behaviour", list(VERDICTS))
def test_one_verdict_per_behaviour_on_every_stack(hostile: str, streams: Streams, behaviour: str, stack: str):
    settings = make_settings(f"{hostile}/b/{behaviour}", max_tokens=MAX_TOKENS, ignore_eos=False, api_key=KEY,
                             read_timeout=TIMEOUT_S, headers_timeout=TIMEOUT_S, connect_timeout=2.0)
    record = streams.run(stack, settings, "close", StopPlan())
    RUNS.append((behaviour, record))
    want = VERDICTS[behaviour]
    if want.error is None:
        assert record.error is None, record.error
        assert (record.tokens, record.done) == (want.tokens, True)
    else:
        assert record.error is not None and re.search(want.error, record.error), record.error
        assert record.tokens <= want.tokens and not record.done
        if not (stack == "requests" and behaviour in ("cut-content-length", "reset-mid", "stall-mid")):
            # (requests' iter_lines waits for 512 bytes of a body that is neither chunked nor sized: the tail
            # it still held when the body broke never reaches the reader; docs/guides/hostile-input.md)
            assert record.tokens == want.tokens
    assert KEY not in json.dumps(record.to_json())
    if behaviour == "invalid-utf8":
        assert record.replaced_chunks == 1
    assert record.ended is not None


def test_every_stream_recorded_is_a_request_the_server_received_and_none_is_lost(hostile: str):
    assert RUNS, "run with the verdict tests"
    ours = Counter((behaviour, record.request_id) for behaviour, record in RUNS)
    theirs = Counter(received(hostile))
    assert ours == theirs
    assert all(n == 1 for n in theirs.values())  # nothing sent twice (no retry, no redirect followed)


# --- a whole run against the mix --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory, hostile: str) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("hostile-run")
    before = len(received(hostile))
    env_key = {"STOPSTORM_API_KEY": KEY}
    old = {k: os.environ.get(k) for k in env_key}
    os.environ.update(env_key)
    try:
        run = run_locust(out, "--host", f"{hostile}/mix/v1", "-u", "12", "-r", "12", "-t", "8s",
                         "--max-tokens", str(MAX_TOKENS), "--stop-probability", "0", "--think-time", "0",
                         "--read-timeout", str(RUN_TIMEOUT_S), "--headers-timeout", str(RUN_TIMEOUT_S),
                         "--connect-timeout", "2", timeout=120)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    got = received(hostile)[before:]
    return {"run": run, "received": got, "records": records(out / "records.jsonl"),
            "report": json.loads((out / "report.json").read_text()), "out": out}


def test_a_run_against_every_misbehaviour_loses_nothing_and_names_every_cause(mixed_run: dict[str, Any]):
    run, recs, report = mixed_run["run"], mixed_run["records"], mixed_run["report"]
    text = run.stdout + run.stderr
    assert run.returncode == 1, text[-3000:]  # failures, and no crash
    assert "Traceback" not in text and "Uncaught exception" not in text, text[-3000:]
    theirs = Counter(rid for _, rid in mixed_run["received"])
    ours = Counter(r["request_id"] for r in recs)
    assert all(n == 1 for n in ours.values()) and all(n == 1 for n in theirs.values())
    assert set(theirs) <= set(ours) and len(theirs) >= len(VERDICTS)  # every request received has its one record
    unseen = [r for r in recs if r["request_id"] not in theirs]  # sent as the run ended, before the server read it
    assert all(r["error"] == INTERRUPTED and r["status"] is None for r in unseen), unseen
    o = report["overall"]["figures"]
    assert o["streams"]["value"] == len(recs)
    interrupted = sum(1 for r in recs if r["error"] == INTERRUPTED)
    failed = sum(1 for r in recs if r["error"] not in (None, INTERRUPTED))
    assert (o["failed"]["value"], o["interrupted"]["value"]) == (failed, interrupted)
    by_id = {rid: behaviour for behaviour, rid in mixed_run["received"]}
    for r in recs:
        if r["error"] == INTERRUPTED:
            continue
        want = VERDICTS[by_id[r["request_id"]]]
        if want.error is None:
            assert r["error"] is None, (by_id[r["request_id"]], r["error"])
        else:
            cause = want.error.replace(f"{TIMEOUT_S:g} s", f"{RUN_TIMEOUT_S:g} s")
            assert r["error"] and re.search(cause, r["error"]), (by_id[r["request_id"]], r["error"])
    out = mixed_run["out"]
    everything = text + (out / "records.jsonl").read_text() + (out / "report.json").read_text()
    assert KEY not in everything
    assert "/mix/v1/v1/" not in everything  # --host ending in /v1 is the server's root plus /v1, once
