"""Every stopstorm option has one rule (metrics/plugin/options.py), checked before anything starts.

- a table of bad values: each is refused by the same check the plugin's init runs, with the option named;
- property tests (hypothesis) over every numeric option: NaN, ±inf, 0, −0, negatives and huge values are
  refused naming the option, and whatever is accepted is finite and within the rule's bounds;
- real `locust` and `stopstorm` runs with bad values: exit 2, one `stopstorm: --option …` line, no traceback,
  no simulator started (or, where it failed to start, none left behind), no report.
"""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (first: gevent's patching, as under Locust)

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, pid_gone
from hypothesis import given, settings
from hypothesis import strategies as st
from locust.argument_parser import get_parser

import stopstorm.metrics.plugin.hooks
import stopstorm.users.options
import stopstorm.users.probe
import stopstorm.users.shapes  # noqa: F401
from stopstorm.metrics.plugin import options
from stopstorm.metrics.plugin.options import Number


def _opts(*argv: str) -> Any:
    """Locust's parsed options for `argv` (a value that starts with "-" is given as --flag=value)."""
    args: list[str] = []
    for a in argv:
        if args and args[-1].startswith("--") and "=" not in args[-1] and a.startswith("-") and a[1:2].isdigit() | (
                a[1:] in ("inf", "0")):
            args[-1] = f"{args[-1]}={a}"
        else:
            args.append(a)
    return get_parser().parse_args(["-f", "locustfile.py", *args])


def refused(*argv: str) -> str:
    """The message the init check refuses `argv` with (it fails the test if it is accepted)."""
    opts = _opts(*argv)
    with pytest.raises(ValueError) as info:
        options.check_options(opts)
    return str(info.value)


@pytest.fixture(scope="module")
def binary_prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    return path


NAN_INF = ("nan", "inf", "-inf")
BAD: list[tuple[tuple[str, ...], str]] = [
    *((("--loop-lag-interval-ms", v), "--loop-lag-interval-ms must be within [1, ") for v in (*NAN_INF, "0", "-5")),
    *((("--max-loop-lag-ms", v), "--max-loop-lag-ms must be >= 0 (ms, finite)") for v in (*NAN_INF, "-1")),
    *((("--hold-seconds", v), "--hold-seconds must be within [0, 1000000] (seconds, finite)") for v in
      (*NAN_INF, "-1", "1e7")),
    *((("--think-time", v), "--think-time must be within [0, 1000000]") for v in (*NAN_INF, "-0.5", "1e300")),
    *((("--read-timeout", v), "--read-timeout must be > 0 and <= 1000000") for v in (*NAN_INF, "0", "-0", "-3")),
    *((("--connect-timeout", v), "--connect-timeout must be > 0") for v in ("nan", "0", "inf")),
    *((("--headers-timeout", v), "--headers-timeout must be > 0") for v in ("nan", "0", "-1")),
    *((("--metrics-interval", v), "--metrics-interval must be within [0.01, 1000000]") for v in
      (*NAN_INF, "0", "-1", "0.001")),
    *((("--arrival-rate", v), "--arrival-rate must be within [0, 1000000]") for v in (*NAN_INF, "-1", "1e9")),
    *((("--temperature", v), "--temperature must be >= 0 (finite)") for v in (*NAN_INF, "-0.1")),
    *((("--stop-probability", v), "--stop-probability must be within [0, 1]") for v in ("nan", "1.5", "-0.1")),
    *((("--max-tokens", v), "--max-tokens must be at least 1 and at most 2147483647") for v in
      ("0", "-1", "99999999999999999999999")),
    *((("--close-mix", v), w) for v, w in (
        ("close:nan", "--close-mix: weight of close must be a finite number >= 0, got nan"),
        ("close:inf,drop:1", "--close-mix: weight of close must be a finite number >= 0, got inf"),
        ("close:-1", "--close-mix: weight of close must be a finite number >= 0"),
        ("slam:1", "--close-mix: unknown close mode 'slam'"),
        ("close:0,drop:0", "give at least one mode with a positive weight"),
        ("close:x", "--close-mix: weight of close is not a number"),
        ("", "give at least one mode"))),
    *((("--stop-at", v), "--stop-at") for v in ("tokens:fixed:nan", "tokens:uniform:5:1", "seconds:exponential:inf",
                                              "later", "tokens:gauss:3", "tokens:fixed:-1")),
    (("--probe-stacks", "requests,curl"), "--probe-stacks: unknown client stack 'curl'; choose from requests"),
    (("--probe-stacks", ","), "--probe-stacks: name at least one client stack"),
    (("--probe-modes", "close,slam"), "--probe-modes: unknown close mode 'slam'"),
    (("--probe-repeats", "0"), "--probe-repeats must be at least 1"),
    (("--probe-stop-tokens", "0"), "--probe-stop-tokens must be at least 1"),
    (("--probe-gap", "nan"), "--probe-gap must be within [0, "),
    (("--probe-json", "/nonexistent-dir/probe.json"), "--probe-json /nonexistent-dir/probe.json: no such directory"),
    (("--probe-early", "soon"), "--probe-early: 'soon' is not a stop point"),
    (("--probe-early", "seconds:-1"), "--probe-early: 'seconds:-1' is not a stop point"),
    (("--probe-early-repeats", "0"), "--probe-early-repeats must be at least 1"),
    (("--probe-report", "/nonexistent-dir/r.json"), "--probe-report /nonexistent-dir/r.json: no such directory"),
    (("--slo", "queue_wait_p95<1.2.3"), "--slo: expected queue_wait_pNN<S"),
    (("--slo", "ttft_p42<1"), "--slo: expected"),
    (("--slo", "queue_wait_p95<0"), "--slo: expected"),
    (("--step-users", "0"), "--step-users must be at least 1"),
    (("--step-seconds", "0"), "--step-seconds must be > 0"),
    (("--step-seconds", "nan"), "--step-seconds must be > 0"),
    (("--step-max-users", "0"), "--step-max-users must be at least 1"),
    (("--step-users", "8", "--step-max-users", "4"), "--step-max-users must be at least --step-users (8), got 4"),
    (("--records-interval", "0"), "--records-interval must be > 0"),
    (("--records-interval", "nan"), "--records-interval must be > 0"),
    (("--records-interval", "inf"), "--records-interval must be > 0"),
    (("--gpu-interval", "0"), "--gpu-interval must be within [0.001, "),
    (("--gpu-interval", "inf"), "--gpu-interval must be within [0.001, "),
    (("--gpu-idle-pct", "100"), "--gpu-idle-pct must be within [0, 100)"),
    (("--gpu-idle-pct", "nan"), "--gpu-idle-pct must be within [0, 100)"),
    (("--gpu-indices", "0,x"), "--gpu-indices wants GPU numbers"),
    (("--gpu-indices", "1,1"), "--gpu-indices wants distinct GPU numbers"),
    (("--dcgm-url", "gpu-host:9400"), "--dcgm-url must be an http(s) URL"),
    (("--sim-max-num-seqs", "0"), "--sim-max-num-seqs must be at least 1"),
    (("--sim-max-num-seqs", "-2"), "--sim-max-num-seqs must be at least 1"),
    (("--sim-args", '"--seed 1'), "--sim-args '\"--seed 1': No closing quotation"),
    (("--sim-args", "--bogus-flag 3"), "--sim-args '--bogus-flag 3': unrecognized arguments: --bogus-flag 3"),
    (("--sim-args", "--step-base-ms -1"), "--sim-args '--step-base-ms -1': argument --step-base-ms"),
    (("--sim-args", "--fault status:503@0.7 --fault empty@0.6"), "at most 1"),
    (("--sim-args", "--fault explode"), "unknown fault"),
    (("--sim-args", "--port 9000"), "--sim-args '--port 9000': --port is set by stopstorm"),
    (("--sim-args=--help",), "stopstorm simulator --help"),
    (("--sim-log", "/nonexistent-dir/sim.log"), "--sim-log /nonexistent-dir/sim.log: no such directory"),
    (("--sim-log", "/proc/sim.log"), "--sim-log /proc/sim.log: cannot write there"),
    (("--stopstorm-records", "/nonexistent-dir/r.jsonl"), "--stopstorm-records /nonexistent-dir/r.jsonl: no such"),
    (("--stopstorm-records", "/proc/records.jsonl"), "--stopstorm-records /proc/records.jsonl: cannot write there"),
    (("--stopstorm-records", "/tmp"), "--stopstorm-records /tmp: is a directory"),
    (("--stopstorm-report", "/nonexistent-dir/report.json"), "--stopstorm-report /nonexistent-dir/report.json: no"),
    (("--stopstorm-report", "/proc/report.json"), "--stopstorm-report /proc/report.json: cannot write there"),
    (("--prompts", "/nonexistent-dir/prompts.txt"), "--prompts /nonexistent-dir/prompts.txt: cannot read"),
    (("--host", "127.0.0.1:8000"), "--host '127.0.0.1:8000': not a valid URL"),
    (("--host", "ftp://127.0.0.1"), "scheme http or https"),
    (("--host", "http://127.0.0.1:99999"), "not a valid URL"),
    (("--host", "http://user:hunter2pass@127.0.0.1:8000/?x=1"),
     "--host 'http://127.0.0.1:8000/?x=1': a base URL takes no query or fragment"),
]


def test_the_table_has_about_ninety_bad_values():
    assert len(BAD) >= 90


@pytest.mark.parametrize(("argv", "words"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_value_is_refused_before_anything_starts_naming_the_option(argv, words):
    message = refused(*argv)
    assert words in message, message
    assert "\n" not in message and "hunter2" not in message


def test_a_binary_prompts_file_names_the_option_and_the_file(binary_prompts):
    message = refused("--prompts", str(binary_prompts))
    assert message.startswith(f"--prompts {binary_prompts}: not UTF-8 text (byte 0x89 at offset 0)"), message


def test_the_defaults_pass():
    options.check_options(_opts())
    options.check_options(_opts(), worker=True)


def test_a_worker_does_not_check_the_files_only_the_master_writes():
    opts = _opts("--stopstorm-report", "/nonexistent-dir/report.json", "--stopstorm-records", "/proc/r.jsonl")
    options.check_options(opts, worker=True)
    with pytest.raises(ValueError):
        options.check_options(opts)


def test_sim_args_are_not_checked_when_a_host_is_given():
    options.check_options(_opts("--host", "http://127.0.0.1:8000", "--sim-args", "--bogus 1"))


# --- every numeric option, every awkward number -------------------------------------------------------------


NUMBERS = [(o, t.title) for t in options.tables() for o in t if isinstance(o.rule, Number)]
AWKWARD = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-300, 1e300, -1e300, 2.0**63, 1e6, 1e6 + 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
)


def test_every_numeric_option_has_a_rule():
    assert len(NUMBERS) >= 20
    numeric = {o.flag for t in options.tables() for o in t if o.type in (int, float)}
    assert numeric == {o.flag for o, _ in NUMBERS}


@pytest.mark.parametrize(("option", "table"), NUMBERS, ids=[o.flag for o, _ in NUMBERS])
@settings(max_examples=60, deadline=None)
@given(value=AWKWARD)
def test_a_number_is_refused_naming_the_option_or_is_finite_and_in_bounds(option, table, value):
    rule = option.rule
    assert isinstance(rule, Number)
    try:
        rule.check(option.flag, value)
    except ValueError as exc:
        assert str(exc).startswith(f"{option.flag} must be "), exc
        return
    assert math.isfinite(value)
    assert rule.low is None or (value > rule.low if rule.above else value >= rule.low)
    assert rule.high is None or (value < rule.high if rule.below else value <= rule.high)
    if rule.integer:
        assert float(value).is_integer()


@pytest.mark.parametrize(("option", "table"), NUMBERS, ids=[o.flag for o, _ in NUMBERS])
def test_every_numeric_default_passes_its_rule(option, table):
    option.rule.check(option.flag, option.default)


# --- real runs -------------------------------------------------------------------------------------------------


def _cmd(tmp_path: Path, *argv: str, cli: bool = False) -> list[str]:
    head = [sys.executable, "-m", "stopstorm"] if cli else [sys.executable, "-m", "locust", "-f",
                                                               str(ROOT / "locustfile.py")]
    return [*head, "--headless", "-u", "1", "-r", "1", "-t", "3s", "--stopstorm-report", str(tmp_path / "report.json"),
            *argv]


def _run(tmp_path: Path, *argv: str, cli: bool = False) -> tuple[int, str, int]:
    """Exit status, output, and the run's PID (the embedded simulator gets it as --parent-pid)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STOPSTORM_", "LOCUST_"))}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(_cmd(tmp_path, *argv, cli=cli), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, proc.pid


def _simulators_of(parent: int) -> list[int]:
    """Live simulator processes started by the run `parent` (their command line names it as --parent-pid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"stopstorm.simulator" in argv and str(parent).encode() in argv and not pid_gone(int(entry.name)):
                found.append(int(entry.name))
    return found


REAL = [
    (("--loop-lag-interval-ms", "nan"), "--loop-lag-interval-ms must be within [1, "),
    (("--think-time", "inf"), "--think-time must be within [0, 1000000]"),
    (("--close-mix", "close:inf,drop:1"), "--close-mix: weight of close must be a finite number >= 0, got inf"),
    (("--read-timeout", "0"), "--read-timeout must be > 0"),
    (("--metrics-interval", "-1"), "--metrics-interval must be within [0.01, "),
    (("--stopstorm-records", "/nonexistent-dir/r.jsonl"), "--stopstorm-records /nonexistent-dir/r.jsonl: no such"),
    (("--sim-log", "/proc/sim.log"), "--sim-log /proc/sim.log: cannot write there"),
    (("--sim-args", '"--seed 1'), "No closing quotation"),
    (("--sim-args", "--bogus-flag 3"), "unrecognized arguments: --bogus-flag 3"),
    (("--sim-max-num-seqs", "0"), "--sim-max-num-seqs must be at least 1"),
]


@pytest.mark.parametrize(("argv", "words"), REAL, ids=[" ".join(a) for a, _ in REAL])
def test_a_real_run_refuses_with_one_line_and_exit_2_before_the_simulator_starts(tmp_path, argv, words):
    code, text, pid = _run(tmp_path, *argv, cli=argv[0] == "--think-time")  # (one through the stopstorm command)
    assert code == 2, text[-3000:]
    assert "Traceback" not in text and "Uncaught exception" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if "stopstorm: " in line]
    assert len(lines) == 1 and words in lines[0], text[-3000:]
    assert "embedded simulator" not in text and not _simulators_of(pid)  # refused before it was started
    assert not (tmp_path / "report.json").exists()


def test_the_capacity_search_refuses_an_unwritable_json_before_the_search(tmp_path):
    """Found only after the whole step search once (a traceback at the end of an hour's run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STOPSTORM_", "LOCUST_"))}
    proc = subprocess.run([sys.executable, "-m", "stopstorm", "capacity", "--headless", "--capacity-json",
                           "/nonexistent-dir/c.json"], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    text = proc.stdout + proc.stderr
    lines = [line for line in text.splitlines() if "stopstorm: " in line]
    assert proc.returncode == 2 and "Traceback" not in text, text[-3000:]
    assert len(lines) == 1 and "--capacity-json /nonexistent-dir/c.json: no such directory" in lines[0], text[-3000:]
    assert "embedded simulator" not in text


def test_a_simulator_that_fails_to_start_is_refused_in_one_line_and_leaves_nothing(tmp_path):
    code, text, pid = _run(tmp_path, "--sim-args=--gpu-work")  # no CUDA here: the simulator exits at once
    if code == 0:
        pytest.skip("this host has torch with CUDA: the simulator's --gpu-work starts")
    assert code == 2, text[-3000:]
    assert "Traceback" not in text and "Uncaught exception" not in text, text[-3000:]
    assert re.search(r"stopstorm: simulator exited with code \d+", text), text[-3000:]
    assert not _simulators_of(pid)


def test_a_target_refused_after_the_simulator_started_stops_it(tmp_path):
    code, text, _ = _run(tmp_path, "--model", "gpt-x")  # the simulator serves llm: the preflight refuses
    assert code == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert re.search(r"stopstorm: --model 'gpt-x': http://127\.0\.0\.1:\d+ serves 'llm'", text), text[-3000:]
    started = re.search(r"started the embedded simulator at \S+ \(pid (\d+)", text)
    assert started, text[-3000:]
    assert pid_gone(int(started.group(1)))  # stopped by the PID the log line names
