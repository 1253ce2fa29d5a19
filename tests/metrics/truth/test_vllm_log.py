"""The vLLM log follower: every line format it must read, and following a file live (append, partial line,
truncation, rotation) and the simulator's own log while a client closes a stream early.

The process is gevent-patched the way a locustfile is: importing `locust` (first, below) patches everything, so
the follower's greenlet runs whenever a test sleeps or waits on a socket.
"""

from __future__ import annotations

import warnings

from gevent.monkey import MonkeyPatchWarning

with warnings.catch_warnings():
    # conftest.py imported httpx (and so ssl) before us; a locustfile imports locust first and never sees this.
    warnings.simplefilter("ignore", MonkeyPatchWarning)
    import locust  # noqa: F401  (gevent monkey-patches the process, as under Locust)

import contextlib
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import FAST, wait_until

from stopstorm.metrics.truth.vllm_log import LogEvent, LogFollower, base_request_id, parse_events, parse_line
from stopstorm.simulator.launcher import EmbeddedSimulator

# The seed's lines, exactly as vLLM 0.9.x wrote them.
SEED_ADDED = "INFO 07-10 18:41:40 [async_llm.py:270] Added request chatcmpl-92d1e14da77b409cbf885d8acdcbb1fe."
SEED_ABORTED = "INFO 07-10 18:41:41 [async_llm.py:431] Aborted request chatcmpl-92d1e14da77b409cbf885d8acdcbb1fe."
SEED_ABORTED_2 = "INFO 07-10 18:41:41 [async_llm.py:339] Request chatcmpl-92d1e14da77b409cbf885d8acdcbb1fe aborted."
SEED_ID = "chatcmpl-92d1e14da77b409cbf885d8acdcbb1fe"

# How late after it is written the follower may stamp a line: its poll plus a greenlet switch on a busy box.
POLL = 0.005
SEEN_TOL_S = 0.05


def line(msg: str, stamp: str = "18:41:41", level: str = "INFO") -> str:
    return f"{level} 07-10 {stamp} [async_llm.py:431] {msg}"


# --- parsing ---------------------------------------------------------------------------------------------------


def test_seed_09_lines():
    ev = parse_line(SEED_ADDED, seen=1.5)
    assert ev == LogEvent("added", SEED_ID, SEED_ID, 18 * 3600 + 41 * 60 + 40, 1.5, log_day=182 + 9)  # 07-10
    for text in (SEED_ABORTED, SEED_ABORTED_2):
        ev = parse_line(text, seen=2.0)
        assert ev is not None
        assert (ev.kind, ev.request_id_raw, ev.request_id_base) == ("aborted", SEED_ID, SEED_ID)
        assert ev.log_time == 18 * 3600 + 41 * 60 + 41


def test_seen_defaults_to_now():
    before = time.monotonic()
    ev = parse_line(SEED_ADDED)
    assert ev is not None and before <= ev.seen <= time.monotonic()


def test_newest_format_with_suffix():
    ev = parse_line(line("Added request chatcmpl-0a1b2c3d4e5f-9f8e7d6c."))
    assert ev is not None
    assert (ev.kind, ev.request_id_raw, ev.request_id_base) == (
        "added", "chatcmpl-0a1b2c3d4e5f-9f8e7d6c", "chatcmpl-0a1b2c3d4e5f")
    ev = parse_line(line("Aborted request(s) cmpl-abc-0123abcd."))
    assert ev is not None
    assert (ev.kind, ev.request_id_raw, ev.request_id_base) == ("aborted", "cmpl-abc-0123abcd", "cmpl-abc")


def test_suffix_rules():
    assert base_request_id("chatcmpl-myid-deadbeef") == "chatcmpl-myid"
    assert base_request_id("chatcmpl-92d1e14da77b409cbf885d8acdcbb1fe") == "chatcmpl-92d1e14da77b409cbf885d8acdcbb1fe"
    assert base_request_id("chatcmpl-x-DEADBEEF") == "chatcmpl-x-DEADBEEF"  # vLLM's suffix is lowercase hex
    assert base_request_id("chatcmpl-x-deadbee") == "chatcmpl-x-deadbee"  # 7 hex is no suffix
    assert base_request_id("chatcmpl-x-deadbeef0") == "chatcmpl-x-deadbeef0"
    assert base_request_id("-deadbeef") == "-deadbeef"
    # A client id that itself ends in -<8 hex>, logged by 0.9 with no suffix: the raw id is kept for matching.
    ev = parse_line(line("Added request chatcmpl-job-cafebabe."))
    assert ev is not None and ev.request_id_raw == "chatcmpl-job-cafebabe" and ev.request_id_base == "chatcmpl-job"


def test_list_of_ids():
    events = parse_events(line("Aborted request(s) chatcmpl-a-00000001,chatcmpl-b-00000002, cmpl-c."), seen=3.0)
    assert [(e.kind, e.request_id_raw, e.request_id_base) for e in events] == [
        ("aborted", "chatcmpl-a-00000001", "chatcmpl-a"),
        ("aborted", "chatcmpl-b-00000002", "chatcmpl-b"),
        ("aborted", "cmpl-c", "cmpl-c"),
    ]
    assert all(e.seen == 3.0 for e in events)
    parsed = parse_line(line("Aborted request(s) chatcmpl-a-00000001,chatcmpl-b-00000002."))
    assert parsed is not None and parsed.request_id_raw == "chatcmpl-a-00000001"


def test_process_prefix_and_ansi():
    ev = parse_line("(APIServer pid=123) " + line("Added request chatcmpl-p-12345678."))
    assert ev is not None and ev.request_id_base == "chatcmpl-p"
    ev = parse_line("\x1b[1;36m(APIServer pid=7)\x1b[0;0m " + line("Aborted request(s) chatcmpl-q-12345678."))
    assert ev is not None and ev.kind == "aborted" and ev.request_id_base == "chatcmpl-q"


@pytest.mark.parametrize("prefix", [
    "Dec 01 10:00:00 gpu-host python3[4242]: ",  # journalctl's short format
    "[pod/vllm-7d9f-x2/vllm] ",  # kubectl logs --prefix
    "2026-12-01T10:00:00.123456789Z ",  # docker logs --timestamps
    "[vllm] (APIServer pid=9) ",  # VLLM_LOGGING_PREFIX, then the process tag
])
def test_transport_prefixes(prefix):
    ev = parse_line(prefix + line("Aborted request(s) chatcmpl-t-12345678."))
    assert ev is not None and (ev.kind, ev.request_id_base) == ("aborted", "chatcmpl-t")
    assert ev.log_time == 18 * 3600 + 41 * 60 + 41 and ev.log_day == 182 + 9
    # The earliest header wins: a message quoting another line's header is that message, not an event.
    assert parse_line(prefix + line("Received request chatcmpl-x: " + line("Added request chatcmpl-y."))) is None


def test_simulator_millisecond_stamp():
    ev = parse_line("INFO 11-24 14:37:49.960 [request_log.py:54] Added request chatcmpl-s-0badf00d.")
    assert ev is not None
    assert ev.request_id_raw == "chatcmpl-s-0badf00d" and ev.request_id_base == "chatcmpl-s"
    assert ev.log_time == pytest.approx(14 * 3600 + 37 * 60 + 49.960)


@pytest.mark.parametrize("text", [
    "",
    "hello",
    "Added request chatcmpl-x.",  # no header
    line("Added request ."),
    line("Added request chatcmpl-x"),  # no final period
    line("Received request chatcmpl-x: prompt: 'Added request chatcmpl-y.'"),
    line("Finished request chatcmpl-x."),
    line("Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 5.1 tokens/s"),
    "INFO:     127.0.0.1:50000 - \"POST /v1/chat/completions HTTP/1.1\" 200 OK",
    "INFO 07-10 18:41 [x.py:1] Added request chatcmpl-x.",  # malformed stamp
    "INFO 07-10 18:41:41 Added request chatcmpl-x.",  # no [file:line]
    "  File \"x.py\", line 3, in <module>",
])
def test_junk_lines_ignored(text):
    assert parse_line(text) is None
    assert parse_events(text) == []


# --- stamps: history told apart from the run -------------------------------------------------------------------


def _stamped(wall: float, shift_s: float, msg: str) -> str:
    """A vLLM line written at `wall` by a server whose local clock reads `shift_s` ahead of ours."""
    return line(msg, stamp=time.strftime("%H:%M:%S", time.localtime(wall + shift_s))).replace(
        "07-10", time.strftime("%m-%d", time.localtime(wall + shift_s)))


def _mono(wall: float) -> float:
    return time.monotonic() - (time.time() - wall)


@pytest.mark.parametrize("shift_h", [0, -7, 5.5, 13, -11.75])
def test_history_before_the_run_is_forgotten_in_any_time_zone(tmp_path, shift_h):
    """A source that replays history first (journalctl, docker logs without --since): every event stamped
    before the run is dropped, none of the run's, whatever the server's zone, across days and years."""
    shift = shift_h * 3600
    f = LogFollower(tmp_path / "unused.log")
    start = time.time() - 20.0  # the run started 20 s ago
    history = {"chatcmpl-old-3d": start - 3 * 86400, "chatcmpl-old-20h": start - 20 * 3600,
               "chatcmpl-old-40d": start - 40 * 86400, "chatcmpl-old-30s": start - 30, "chatcmpl-old-2s": start - 2.0}
    for rid, written in history.items():  # all replayed at once, just after the start
        f._handle(_stamped(written, shift, f"Added request {rid}.").encode(), _mono(start + 0.05))
    live = {f"chatcmpl-new-{i}": start + 0.3 + 2.5 * i for i in range(6)}
    for rid, written in live.items():  # read 2 ms after each is written
        f._handle(_stamped(written, shift, f"Aborted request(s) {rid}.").encode(), _mono(written + 0.002))
    assert f.stamp_offset is not None and abs(f.stamp_offset + shift) < 1.01  # read time − stamp
    assert f.forget_before(start) == len(history) == f.before_run
    assert set(f.added) == set() and set(f.aborted) == set(live) and f.events == len(live)
    assert f.lines == len(history) + len(live)
    assert f.matched(["chatcmpl-new-0", "chatcmpl-new-3", "chatcmpl-old-2s"]) == 2
    assert f.forget_before(start) == 0  # idempotent


def test_history_alone_is_forgotten_when_older_than_any_time_zone(tmp_path):
    """Nothing live read (the shift cannot be learnt): lines older than the widest zone gap (27 h) still go."""
    f = LogFollower(tmp_path / "unused.log")
    start = time.time() - 5.0
    for rid, written in {"chatcmpl-8d": start - 8 * 86400, "chatcmpl-2d": start - 2 * 86400,
                         "chatcmpl-20h": start - 20 * 3600}.items():
        f._handle(_stamped(written, 0, f"Added request {rid}.").encode(), _mono(start + 0.05))
    assert f.forget_before(start) == 2 and set(f.added) == {"chatcmpl-20h"}


def test_without_a_stamped_line_nothing_is_forgotten(tmp_path):
    f = LogFollower(tmp_path / "unused.log")
    f._handle(b"INFO:     127.0.0.1:5000 - \"POST /v1/chat/completions HTTP/1.1\" 200 OK", time.monotonic())
    assert f.stamp_offset is None and f.forget_before(time.time()) == 0


def test_calendar_wraps_at_the_year():
    from stopstorm.metrics.truth import vllm_log as vl

    dec31 = vl._day_of_year(12, 31)
    jan1 = vl._day_of_year(1, 1)
    assert dec31 is not None and jan1 == 0
    assert vl._wrap(jan1 * 86400 + 1 - (dec31 * 86400 + 86399)) == pytest.approx(2.0)
    assert vl._day_of_year(13, 1) is None and vl._day_of_year(2, 29) == 59


# --- following a file ------------------------------------------------------------------------------------------


class Writer:
    """Appends to a log file the way a logging handler does, and remembers when each line was flushed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self.written: dict[str, float] = {}

    def write(self, text: str, rid: str | None = None) -> None:
        self.f.write(text)
        self.f.flush()
        if rid is not None:
            self.written[rid] = time.monotonic()

    def event(self, kind: str, rid: str) -> None:
        msg = f"Added request {rid}." if kind == "added" else f"Aborted request(s) {rid}."
        self.write(line(msg) + "\n", base_request_id(rid))

    def reopen(self) -> None:
        self.f.close()
        self.f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        self.f.close()


@pytest.fixture
def follow(tmp_path: Path) -> Iterator[tuple[Path, list[LogEvent], list[LogFollower]]]:
    path = tmp_path / "vllm.log"
    got: list[LogEvent] = []
    followers: list[LogFollower] = []
    yield path, got, followers
    for f in followers:
        f.stop()
        assert f.errors == 0, f.last_error


def start(path: Path, got: list[LogEvent], followers: list[LogFollower], **kw: object) -> LogFollower:
    f = LogFollower(path, poll=POLL, on_event=got.append, **kw)  # type: ignore[arg-type]
    followers.append(f)
    return f.start()


def check_seen(f: LogFollower, w: Writer, kind: str, rid: str) -> LogEvent:
    table = f.added if kind == "added" else f.aborted
    ev = wait_until(lambda: table.get(rid), timeout=2.0, what=f"{kind} {rid}")
    written = w.written[rid]
    assert written <= ev.seen <= written + SEEN_TOL_S, (ev.seen - written)
    return ev


def test_follow_appends(follow):
    path, got, followers = follow
    w = Writer(path)
    w.write(SEED_ADDED + "\nold junk\n")  # before start: not read with from_start=False
    f = start(path, got, followers)
    for i in range(5):
        w.event("added", f"chatcmpl-r{i}-0000000{i}")
        check_seen(f, w, "added", f"chatcmpl-r{i}")
        time.sleep(0.01)
    w.event("aborted", "chatcmpl-r3-00000003")
    ev = check_seen(f, w, "aborted", "chatcmpl-r3")
    assert f.lookup("chatcmpl-r3") == (f.added["chatcmpl-r3"], ev)
    assert f.lookup("chatcmpl-r3-00000003") == (f.added["chatcmpl-r3"], ev)
    assert f.lookup(SEED_ID) == (None, None)
    assert f.lookup("chatcmpl-r4") == (f.added["chatcmpl-r4"], None)
    time.sleep(0.05)
    assert [(e.kind, e.request_id_base) for e in got] == [("added", f"chatcmpl-r{i}") for i in range(5)] + [
        ("aborted", "chatcmpl-r3")]
    assert f.lines == 6
    w.close()


def test_from_start_and_09_double_abort_counted_once(follow):
    path, got, followers = follow
    path.write_text("\n".join([SEED_ADDED, SEED_ABORTED, SEED_ABORTED_2]) + "\n")
    f = start(path, got, followers, from_start=True)
    wait_until(lambda: f.lines == 3, timeout=2.0)
    assert [e.kind for e in got] == ["added", "aborted"]
    added, aborted = f.lookup(SEED_ID)
    assert added is not None and aborted is not None
    assert aborted.log_time == 18 * 3600 + 41 * 60 + 41
    assert f.events == 2


def test_partial_line_waits_for_its_end(follow):
    path, got, followers = follow
    w = Writer(path)
    f = start(path, got, followers)
    w.write(line("Added request chatcmpl-part-1234"))
    time.sleep(0.05)
    assert f.added == {} and f.lines == 0
    w.write("abcd.\n", "chatcmpl-part")
    check_seen(f, w, "added", "chatcmpl-part")
    assert f.added["chatcmpl-part"].request_id_raw == "chatcmpl-part-1234abcd"
    assert len(got) == 1
    w.close()


def test_file_created_after_start(follow):
    path, got, followers = follow
    f = start(path, got, followers)
    time.sleep(0.03)
    assert f.running and f.errors == 0
    w = Writer(path)
    w.event("added", "chatcmpl-late-11111111")
    check_seen(f, w, "added", "chatcmpl-late")
    assert f.reopens == 0 and f.lines == 1
    w.close()


def test_truncation(follow):
    path, got, followers = follow
    w = Writer(path)
    f = start(path, got, followers)
    for i in range(3):
        w.event("added", f"chatcmpl-t{i}-aaaaaaa{i}")
    wait_until(lambda: len(got) == 3, timeout=2.0)
    os.truncate(path, 0)
    time.sleep(0.03)  # let the follower see the file shrink before it grows again
    w.event("aborted", "chatcmpl-t1-aaaaaaa1")
    check_seen(f, w, "aborted", "chatcmpl-t1")
    time.sleep(0.03)
    assert [e.kind for e in got] == ["added"] * 3 + ["aborted"]
    assert f.truncations == 1
    w.close()


def test_rotation(follow):
    path, got, followers = follow
    w = Writer(path)
    f = start(path, got, followers)
    w.event("added", "chatcmpl-o1-bbbbbbb1")
    check_seen(f, w, "added", "chatcmpl-o1")
    # Rotate: rename the file away, keep writing to it a moment, then start a new one at the same path.
    os.rename(path, path.with_suffix(".log.1"))
    w.event("added", "chatcmpl-o2-bbbbbbb2")
    check_seen(f, w, "added", "chatcmpl-o2")
    w.write(line("Aborted request(s) chatcmpl-o2-bbb"))  # partial line left in the old file
    time.sleep(0.03)
    w.reopen()
    w.event("aborted", "chatcmpl-o1-bbbbbbb1")
    check_seen(f, w, "aborted", "chatcmpl-o1")
    time.sleep(0.03)
    assert f.reopens == 1
    # The old file's unterminated last line is not glued to the new file's first line.
    assert "chatcmpl-o2" not in f.aborted
    assert [(e.kind, e.request_id_base) for e in got] == [
        ("added", "chatcmpl-o1"), ("added", "chatcmpl-o2"), ("aborted", "chatcmpl-o1")]
    w.event("added", "chatcmpl-o3-bbbbbbb3")
    check_seen(f, w, "added", "chatcmpl-o3")
    w.close()


def test_raw_id_beats_base_alias(follow):
    path, got, followers = follow
    w = Writer(path)
    f = start(path, got, followers)
    # A client id ending in -<8 hex>, then (newest vLLM) the same client id with vLLM's suffix added.
    w.event("added", "chatcmpl-job-cafebabe")
    w.event("added", "chatcmpl-job-cafebabe-01234567")
    w.event("added", "chatcmpl-job")
    wait_until(lambda: len(got) == 3, timeout=2.0)
    assert f.added["chatcmpl-job-cafebabe"].request_id_raw == "chatcmpl-job-cafebabe"
    assert f.added["chatcmpl-job-cafebabe-01234567"].request_id_raw == "chatcmpl-job-cafebabe-01234567"
    assert f.added["chatcmpl-job"].request_id_raw == "chatcmpl-job"
    w.close()


def test_errors_are_recorded_not_raised(tmp_path):
    def boom(ev: LogEvent) -> None:
        raise ValueError("bad callback")

    path = tmp_path / "x.log"
    w = Writer(path)
    f = LogFollower(path, poll=POLL, on_event=boom).start()
    try:
        w.event("added", "chatcmpl-e1-cccccccc")
        wait_until(lambda: f.errors == 1, timeout=2.0)
        assert f.last_error == "ValueError: bad callback"
        w.event("added", "chatcmpl-e2-cccccccc")
        wait_until(lambda: "chatcmpl-e2" in f.added, timeout=2.0)
        assert f.running and f.errors == 2
    finally:
        t = time.monotonic()
        f.stop()
        assert time.monotonic() - t < 1.0 and not f.running
        w.close()


def test_stop_reads_what_was_written_before_it(tmp_path):
    path = tmp_path / "x.log"
    w = Writer(path)
    f = LogFollower(path, poll=10.0).start()
    time.sleep(0.01)
    w.event("added", "chatcmpl-last-dddddddd")
    t = time.monotonic()
    f.stop()
    assert time.monotonic() - t < 0.5
    assert "chatcmpl-last" in f.added
    w.close()


# --- the simulator's own log -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["latest", "0.9"])
def sim(request: pytest.FixtureRequest) -> Iterator[tuple[str, EmbeddedSimulator]]:
    proc = EmbeddedSimulator([*FAST, "--vllm-flavour", request.param])
    proc.start()
    yield request.param, proc
    proc.stop()
    with contextlib.suppress(OSError):
        os.unlink(proc.log_path)


def test_simulator_abort_confirmed_live(sim):
    flavour, proc = sim
    rid = f"myid{flavour.replace('.', '')}"
    f = LogFollower(proc.log_path).start()  # default poll
    try:
        assert proc.url is not None
        with httpx.Client(timeout=10.0) as client:
            body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 200,
                    "ignore_eos": True}
            with client.stream("POST", proc.url + "/v1/chat/completions", json=body,
                               headers={"X-Request-Id": rid}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                data = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data: ")]
                assert data
                closed = time.monotonic()
        client_id = f"chatcmpl-{rid}"
        aborted = wait_until(lambda: f.lookup(client_id)[1], timeout=2.0, what=f"abort of {client_id}")
        added = f.lookup(client_id)[0]
        assert added is not None and added.seen <= aborted.seen
        assert 0 <= aborted.seen - closed <= SEEN_TOL_S, aborted.seen - closed
        hexed = f"{client_id}-{zlib.crc32(client_id.encode()):08x}"
        if flavour == "0.9":
            assert aborted.request_id_raw == client_id
        else:  # as vLLM 0.32: `Aborted request(s) <id>-<hex>.`, then `Request <id> aborted.`
            assert aborted.request_id_raw in (hexed, client_id)
            first = f.lookup(hexed)[1]
            assert first is not None and first.request_id_base == client_id
        assert aborted.request_id_base == client_id
        assert added.log_time is not None and aborted.log_time is not None
        assert 0 <= aborted.log_time - added.log_time < 2
        time.sleep(0.05)
        # 0.9 names one id twice (counted once); the newest names two ids, one line each
        assert f.events == (2 if flavour == "0.9" else 3)
        assert f.errors == 0, f.last_error
    finally:
        f.stop()
