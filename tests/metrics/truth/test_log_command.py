"""The server log read through a command or standard input (metrics/truth/log_command.py): a recorded real vLLM
log printed at a pace (both formats), history replayed first, a command that dies mid-run, one that never
prints, one that cannot start, stderr kept apart, the process group stopped by PID, an fd that ends, an
overlong line, and the hub kept free while a chatty command prints.

The process is gevent-patched the way a locustfile is (`locust` first), so the followers' greenlets run
whenever a test sleeps or waits.
"""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (gevent monkey-patches the process, as under Locust)

import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from conftest import FIXTURES_DIR, ROOT, pid_gone, wait_until

from stopstorm.metrics.truth import log_command
from stopstorm.metrics.truth.log_command import PipeLogFollower
from stopstorm.metrics.truth.vllm_log import LogIndex, parse_events

PLAYER = ROOT / "tests" / "log_player.py"
V032 = FIXTURES_DIR / "vllm-0.32-cpu" / "server.log"
V09 = FIXTURES_DIR / "vllm-0.9-cpu" / "server.log"
# How late after its print a line may be stamped: a pipe hop and a greenlet switch on a busy 2-core box.
SEEN_TOL_S = 0.05


def player(log: Path, *args: str) -> str:
    return shlex.join([sys.executable, str(PLAYER), str(log), *args])


@pytest.fixture
def followers() -> Iterator[list[PipeLogFollower]]:
    made: list[PipeLogFollower] = []
    yield made
    for f in made:
        f.stop()
        assert f.pid is None or pid_gone(f.pid)


def follow(made: list[PipeLogFollower], command: str, **kw: object) -> tuple[PipeLogFollower, list[str]]:
    problems: list[str] = []
    f = PipeLogFollower(command, on_problem=problems.append, **kw)  # type: ignore[arg-type]
    made.append(f)
    return f.start(), problems


def log_lines(path: Path) -> list[str]:
    """The file's lines as a follower sees them: split at "\n" only (vLLM's log holds a few lone "\r")."""
    return path.read_bytes().decode("utf-8", "replace").removesuffix("\n").split("\n")


def marks(path: Path) -> dict[int, float]:
    out = {}
    for text in path.read_text().splitlines():
        t, i = text.split()
        out[int(i)] = float(t)
    return out


@pytest.mark.parametrize("log", [V032, V09], ids=["vllm-0.32", "vllm-0.9"])
def test_a_recorded_vllm_log_at_a_pace_indexes_as_the_file_does(followers, tmp_path, log):
    """The command form reads the real log line by line as it comes, each line stamped as it arrives, and
    indexes exactly the events a saved copy of the same file gives."""
    lines = log_lines(log)
    mark_file = tmp_path / "marks"
    f, problems = follow(followers, player(log, "--interval", "0.004", "--marks", str(mark_file), "--then-sleep",
                                           "30"))
    wait_until(lambda: f.lines == len(lines), timeout=20, what="every line")
    saved = LogIndex.from_lines(lines)
    assert {k: (e.kind, e.request_id_raw) for k, e in f.added.items()} == {
        k: (e.kind, e.request_id_raw) for k, e in saved.added.items()}
    assert {k: e.request_id_raw for k, e in f.aborted.items()} == {
        k: e.request_id_raw for k, e in saved.aborted.items()}
    assert f.lookup("chatcmpl-fix-cut-5")[1] is not None and f.lookup("chatcmpl-fix-full-1")[1] is None
    printed = marks(mark_file)
    index = {text: i for i, text in enumerate(lines)}
    late = []
    for ev in f.indexed():
        i = next(i for t, i in index.items() if ev.request_id_raw in t and (
            "Added" in t if ev.kind == "added" else "bort" in t))
        late.append(ev.seen - printed[i])
    # The player notes its mark after the line is out, so the reader may stamp first, by a scheduling delay.
    assert late and all(-0.02 <= d <= SEEN_TOL_S for d in late), [d for d in late if not -0.02 <= d <= SEEN_TOL_S]
    assert f.running and problems == [] and f.errors == 0
    t = time.monotonic()
    f.stop()
    assert time.monotonic() - t < 2.0
    assert f.returncode is not None and f.returncode < 0 and not f.ended_early  # stopped by us (SIGTERM)
    assert pid_gone(f.pid or 0) and f.describe()["exit"]["during_run"] is False


def test_history_the_command_replays_is_forgotten(followers, tmp_path):
    """`kubectl logs -f` without --since: the whole recorded log first, stamped days ago, then the live lines."""
    history = log_lines(V032)
    n = len(history)
    doubled = tmp_path / "twice.log"
    doubled.write_text("\n".join(history + history) + "\n")  # the same ids again, live this time
    start = time.time()
    f, problems = follow(followers, player(doubled, "--history", str(n), "--restamp", "--interval", "0.002",
                                           "--then-sleep", "30"))
    wait_until(lambda: f.lines == 2 * n, timeout=20, what="every line")
    f.stop()
    saved = LogIndex.from_lines(history)
    dropped = f.forget_before(start)
    assert dropped == sum(len(parse_events(t)) for t in history) == 7  # one per line naming an id
    assert f.before_run == dropped and f.events == len({id(e) for e in [*saved.added.values(),
                                                                         *saved.aborted.values()]})
    assert set(f.aborted) == set(saved.aborted) and set(f.added) == set(saved.added)
    assert all(ev.seen > 0 and ev.log_day is not None for ev in f.indexed())
    assert f.matched(["chatcmpl-fix-cut-5", "chatcmpl-nobody"]) == 3  # added, and its two abort lines
    assert problems == []


def test_a_command_that_dies_mid_run(followers):
    f, problems = follow(followers, player(V032, "--interval", "0.001", "--die-after", "112", "--exit", "3",
                                           "--stderr", "error: lost connection to pod"))
    wait_until(lambda: problems, timeout=20, what="the exit")
    assert f.returncode == 3 and f.ended_early and not f.running
    assert len(problems) == 1
    assert "exited with code 3" in problems[0] and "after 112 lines" in problems[0]
    assert problems[0].endswith("lost connection to pod; aborts after that are not confirmed per request")
    assert f.lookup("chatcmpl-fix-cut-5")[1] is not None  # what came before the exit is kept
    assert f.lookup("chatcmpl-fix-cut-10")[0] is None
    f.stop()
    d = f.describe()
    assert d["exit"] == {"code": 3, "after_s": f.exited_after, "during_run": True}
    assert d["stderr_tail"] == ["error: lost connection to pod"] and d["problems"] == problems


def test_a_command_that_never_prints(followers):
    f, problems = follow(followers, "sleep 60", silent_after=0.3)
    wait_until(lambda: problems, timeout=5, what="the silence")
    assert problems == ["the server log command `sleep 60` has printed nothing in 0.3 s: is it the server's log "
                        "(vLLM names every request only with --enable-log-requests)?"]
    assert f.running
    t = time.monotonic()
    f.stop(timeout=1.0)
    assert time.monotonic() - t < 2.5 and pid_gone(f.pid or 0)
    assert len(problems) == 2 and "printed nothing in the" in problems[1]
    assert f.lines == 0 and not f.ended_early


def test_a_command_that_cannot_start(followers, monkeypatch):
    f, problems = follow(followers, "stopstorm-no-such-command --follow")
    wait_until(lambda: problems, timeout=5, what="the exit")
    assert f.returncode == 127 and f.ended_early
    assert "exited with code 127" in problems[0] and "having printed nothing" in problems[0]
    assert "not found" in problems[0]  # the shell's own words, from stderr
    monkeypatch.setattr(log_command, "_SHELL", "/nonexistent/sh")
    g, problems2 = follow(followers, "tail -F x")
    assert problems2 and problems2[0].startswith("the server log command `tail -F x` cannot start (FileNotFound")
    assert not g.running and g.pid is None
    g.stop()
    assert len(problems2) == 1


def test_stderr_is_kept_apart(followers):
    added = "INFO 12-01 10:00:00 [async_llm.py:1] Added request chatcmpl-{}-12345678."
    cmd = f"echo '{added.format('err')}' >&2; echo '{added.format('out')}'; echo 'warning: x' >&2; sleep 60"
    f, _ = follow(followers, cmd)
    wait_until(lambda: f.lines == 1 and f.stderr_lines == 2, timeout=5, what="both streams")
    assert set(f.added) == {"chatcmpl-out", "chatcmpl-out-12345678"}
    assert list(f.stderr_tail) == [added.format("err"), "warning: x"]


def _group(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                out.append(int(d.name))
    return out


def test_stop_ends_the_whole_process_group_by_its_pid(followers):
    """A shell that starts more than one process (ssh and a pipe, say): every one of them is stopped, also one
    that ignores SIGTERM (SIGKILL after the timeout)."""
    f, _ = follow(followers, "sleep 60 | cat & trap '' TERM; while :; do sleep 0.1; done")
    assert f.pid is not None
    wait_until(lambda: len(_group(f.pid or 0)) >= 3, timeout=5, what="the group")
    assert os.getpgid(f.pid) == f.pid != os.getpgid(0)
    t = time.monotonic()
    f.stop(timeout=0.5)
    assert time.monotonic() - t < 2.5
    wait_until(lambda: _group(f.pid or 0) == [], timeout=5, what="an empty group")


def test_an_fd_that_ends(tmp_path):
    """The stdin form on any fd: lines as they come, and its end (whatever piped the log in exited) a problem."""
    r, w = os.pipe()
    problems: list[str] = []
    f = PipeLogFollower(fd=r, on_problem=problems.append).start()
    try:
        os.write(w, b"INFO 12-01 10:00:00 [a.py:1] Added request chatcmpl-p-12345678.\nINFO 12-01 10:00:0")
        wait_until(lambda: f.lines == 1, timeout=2)
        os.write(w, b"1 [a.py:1] Aborted request(s) chatcmpl-p-12345678.")  # its last line, no newline
        os.close(w)
        wait_until(lambda: problems, timeout=2)
        assert f.lookup("chatcmpl-p")[1] is not None and f.lines == 2
        assert problems == [f"fd {r} ended after 2 lines, during the run (whatever piped the log in has exited); "
                            "aborts after that are not confirmed per request"]
        assert f.ended_early and f.returncode is None
    finally:
        f.stop()
        os.close(r)  # the caller's fd: the follower leaves it open
    assert PipeLogFollower.stdin().source == "stdin" and PipeLogFollower.stdin().describe()["path"] == "-"


def test_an_overlong_line_is_dropped_and_counted(followers):
    cmd = ("python3 -c \"import sys; sys.stdout.write('x' * 300000 + '\\n'); "
           "sys.stdout.write('INFO 12-01 10:00:00 [a.py:1] Added request chatcmpl-after-12345678.\\n')\"; sleep 60")
    f, _ = follow(followers, cmd, max_line=100000, chunk=4096)
    wait_until(lambda: "chatcmpl-after" in f.added, timeout=5)
    assert f.overlong == 1 and f.lines == 1


def test_a_chatty_command_keeps_the_hub_free(followers):
    """200,000 log lines as fast as the shell prints them: another greenlet still runs every millisecond or so
    (the reader holds the hub for one chunk's parsing at most) and every line is read."""
    line = "(APIServer pid=1) INFO 12-01 10:00:00 [async_llm.py:578] Added request chatcmpl-chatty-bf54943d."
    n = 200_000
    lags: list[float] = []
    stop = False

    def sampler() -> None:
        while not stop:
            t = time.perf_counter()
            gevent.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    g = gevent.spawn(sampler)
    try:
        t0 = time.perf_counter()
        f, _ = follow(followers, f"yes '{line}' | head -n {n}; sleep 60")
        wait_until(lambda: f.lines == n, timeout=60, interval=0.01, what="every line")
        took = time.perf_counter() - t0
    finally:
        stop = True
        g.join(1)
    q = statistics.quantiles(lags, n=100)
    print(f"\n{n} lines in {took:.2f} s ({n / took:,.0f} lines/s, {took / n * 1e6:.1f} µs/line); hub lag "
          f"p50 {q[49] * 1e3:.2f} ms, p99 {q[98] * 1e3:.2f} ms, max {max(lags) * 1e3:.2f} ms")
    assert f.events == 1 and f.errors == 0  # the first line; the rest repeat its id
    assert max(lags) < 0.1 and q[98] < 0.03, (q[98], max(lags))
