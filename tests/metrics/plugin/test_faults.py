"""Every injected fault, through every client stack: one headless Locust run per stack (its user class named on
the command line) against a simulator drawing one fault per request (`--fault SPEC@RATE`).

The schedule is fixed: the simulator draws faults from a generator seeded by `--seed`, the k-th request it
receives gets the k-th draw, and SEED is one whose first ALL_FAULTS_BY draws hold every fault. Each run is one
stack, so every (fault, stack) pair occurs in every run of this test, and each is asserted (the run's own
request count is checked against ALL_FAULTS_BY first, so a run too short fails saying so).

For each pair: the simulator's ledger says it was injected; every ledger request has its record in the JSONL
and the report; the record's failure names the cause (or, for valid-but-odd SSE, there is no failure and every
token was read); Locust's own failure table counts exactly the records that failed with that cause; the run
ends by itself with its report written and no traceback.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from typing import Any

import pytest
from conftest import FAST
from locust_tools import SimProcess, figure, free_port, records, run_locust, server_id

from stopstorm.metrics.record import INTERRUPTED
from stopstorm.simulator.faults import Fault, FaultPlan, parse_fault
from stopstorm.users.stacks import STACKS

TIMEOUT_S = 2.0  # the run's --read-timeout and --headers-timeout
SLOW_S = 5  # a stall or a header delay: well past the timeouts
TOKENS = 12  # every stream asks exactly this many (ignore_eos), so every fault point is reached

# Fault → the cause a stream it hit must be failed with (None: valid SSE, the stream must succeed).
CAUSES: dict[str, str | None] = {
    "status:400": r"^HTTP 400: ",
    "status:429": r"^HTTP 429: ",
    "status:500": r"^HTTP 500: ",
    "status:503": r"^HTTP 503: ",
    "error-after:3": r"^server error mid-stream: ",
    "reset-after:3": r"^stream cut off: connection broken mid-stream",
    f"stall-after:3:{SLOW_S}": rf"^timeout: no (response )?byte for {TIMEOUT_S:g} s",
    f"slow-headers:{SLOW_S}": rf"^timeout: no response headers within {TIMEOUT_S:g} s$",
    "malformed:not-json": r"^malformed stream: (JSONDecodeError|Expecting)",
    "malformed:missing-fields": r"^malformed stream: (KeyError|chunk without choices)",
    "malformed:crlf": None,
    "malformed:no-space": None,
    "malformed:comments": None,
    "empty": r"^stream cut off: the server closed it before data: \[DONE\]",
}
RATE = 0.05  # 14 faults: 70 % of requests get one, 30 % none
SEED = 14  # its fault generator ("faults:14") draws all 14 faults within its first 18 draws (found by search)
ALL_FAULTS_BY = 18
STACK_NAMES = list(STACKS)


def _failure_text(cell: str) -> str:
    """The message in a Locust error-report `Error` cell, which holds the exception's repr."""
    assert cell.startswith("StreamFailure(") and cell.endswith(")"), cell
    return str(ast.literal_eval(cell[len("StreamFailure("):-1]))


def _error_report(output: str) -> list[dict[str, str]]:
    """Locust's own failure table as it prints it at shutdown ("Error report"), after every user has stopped.

    Not `--csv`'s failures file: Locust rewrites that once a second from a greenlet of its own and never after
    the users stop, so failures of the run's last second (streams a timeout ended as the run ended) may be
    missing from it. The printed report is taken from the final stats.
    """
    assert "Error report" in output, output[-3000:]
    rows = []
    for line in output.rsplit("Error report", 1)[1].splitlines()[3:]:
        if line.startswith("---"):
            break
        m = re.match(r"^(\d+)\s+(\S+) (.*?): (StreamFailure\(.*\))\s*$", line)
        assert m, line
        rows.append({"Occurrences": m[1], "Method": m[2], "Name": m[3], "Error": m[4]})
    return rows


# --- the grammar ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", list(CAUSES))
def test_every_fault_spec_parses_and_keeps_its_text(spec):
    fault = parse_fault(f"{spec}@0.25")
    assert fault.spec == spec and fault.rate == 0.25


@pytest.mark.parametrize(("spec", "words"), [
    ("status:404", "400, 429, 500, 503"), ("explode", "unknown fault"), ("error-after:x", "whole number"),
    ("stall-after:3", "unknown fault"), ("slow-headers:-1", ">= 0"), ("malformed:weird", "not-json"),
    ("empty@1.5", "[0, 1]"), ("status:503@x", "[0, 1]"),
])
def test_a_bad_spec_is_refused_with_what_is_allowed(spec, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_fault(spec)


def test_rates_over_one_are_refused_and_draws_follow_the_rates():
    with pytest.raises(ValueError, match="at most 1"):
        FaultPlan([parse_fault("empty@0.6"), parse_fault("status:503@0.5")])
    plan = FaultPlan([parse_fault("empty@0.2"), parse_fault("status:503@0.3")], seed=1)
    draws = Counter(f.spec if isinstance(f, Fault) else None for f in (plan.draw() for _ in range(20_000)))
    assert abs(draws["empty"] / 20_000 - 0.2) < 0.02 and abs(draws["status:503"] / 20_000 - 0.3) < 0.02


# --- one run per stack, with every fault ----------------------------------------------------------------------


def test_the_seeded_schedule_draws_every_fault_early():
    """The premise of the runs below, checked on the simulator's own FaultPlan with the runs' seed and specs."""
    plan = FaultPlan([parse_fault(f"{spec}@{RATE}") for spec in CAUSES], seed=SEED)
    first = [f.spec if isinstance(f, Fault) else None for f in (plan.draw() for _ in range(ALL_FAULTS_BY))]
    assert set(first) - {None} == set(CAUSES)


@pytest.fixture(scope="module", params=STACK_NAMES)
def fault_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    stack: str = request.param
    out = tmp_path_factory.mktemp(f"faults-{stack}")
    flags = [*FAST, "--max-num-seqs", "32", "--seed", str(SEED)]
    for spec in CAUSES:
        flags += ["--fault", f"{spec}@{RATE}"]
    sim = SimProcess(free_port(), flags, out / "simulator.log").start()
    try:
        # 4 users, 4 s: ~100 streams, the first ALL_FAULTS_BY of them (every fault) sent in the first ~0.5 s,
        # so even a 2 s timeout they meet ends well before the run does.
        run = run_locust(out, "--host", sim.url, "-u", "4", "-r", "4", "-t", "4s", "--max-tokens", str(TOKENS),
                         "--ignore-eos", "--stop-probability", "0", "--think-time", "0.05",
                         "--read-timeout", str(TIMEOUT_S), "--headers-timeout", str(TIMEOUT_S),
                         STACKS[stack].__name__)
        ledger = sim.ledger()
    finally:
        sim.stop()
    failures = _error_report(run.stdout + run.stderr)
    return {"stack": stack, "run": run, "ledger": ledger,
            "records": {server_id(r): r for r in records(out / "records.jsonl")},
            "report": json.loads((out / "report.json").read_text()), "failures": failures}


def test_the_run_is_one_stack_and_long_enough_for_every_fault(fault_run):
    assert {r["stack"] for r in fault_run["records"].values()} == {fault_run["stack"]}
    assert len(fault_run["ledger"]) >= ALL_FAULTS_BY, "the run sent too few requests for the schedule"


def test_the_run_ends_by_itself_with_a_full_report_and_no_traceback(fault_run):
    run, report, recs = fault_run["run"], fault_run["report"], fault_run["records"]
    text = run.stdout + run.stderr
    assert run.returncode == 1, text[-3000:]  # Locust's exit code for a run with failures
    assert "Traceback" not in text, text[-3000:]
    assert report["meta"]["partial"] is False
    assert report["meta"]["records"]["written"] == len(recs)
    assert figure(report, "overall", "streams") == len(recs)
    assert figure(report, "run", "unmatched_requests") == 0  # every ledger request is in the report


def test_every_ledger_request_is_in_the_jsonl(fault_run):
    missing = [rid for rid in fault_run["ledger"] if rid not in fault_run["records"]]
    assert not missing


def test_requests_without_a_fault_succeed(fault_run):
    plain = [fault_run["records"][rid] for rid, e in fault_run["ledger"].items() if e["fault"] is None]
    assert len(plain) >= 10
    assert all(r["error"] in (None, INTERRUPTED) for r in plain), [r["error"] for r in plain if r["error"]]


@pytest.mark.parametrize("spec", list(CAUSES))
def test_fault_is_recorded_with_its_cause(fault_run, spec):
    cause = CAUSES[spec]
    hit = {rid: e for rid, e in fault_run["ledger"].items() if e["fault"] == spec}
    assert hit, f"the simulator drew no {spec} in the {fault_run['stack']} run"
    recs = [fault_run["records"][rid] for rid in hit]
    finished = [r for r in recs if r["error"] != INTERRUPTED]
    assert finished, f"every {spec} stream of {fault_run['stack']} was cut by the run's end"
    if cause is None:  # valid SSE in an odd shape: read to the end, every token counted
        for r in finished:
            assert r["error"] is None and r["done"], r
            assert r["tokens"] == hit[server_id(r)]["generated_tokens"] == TOKENS
        return
    for r in finished:
        assert r["error"] is not None and re.search(cause, r["error"]), (r["stack"], r["error"])
    entries = [hit[server_id(r)] for r in finished]
    if spec.startswith(("status:", "error-after", "reset-after", "empty")):  # the server failed it: truth says so
        assert all(e["error"] for e in entries), entries
    if spec.startswith(("stall-after", "slow-headers")):  # the client gave up: the server saw it close
        assert all(e["disconnect_seen"] is not None for e in entries), entries
    # Locust's failure table counts the same streams under the same cause.
    counted = sum(int(row["Occurrences"]) for row in fault_run["failures"]
                  if re.search(cause, _failure_text(row["Error"])))
    failed_here = sum(1 for r in fault_run["records"].values() if r["error"] and re.search(cause, r["error"]))
    assert counted == failed_here >= len(finished)
