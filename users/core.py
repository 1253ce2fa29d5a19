"""The streaming core every client stack shares: reading, Stop, abandoning the stream, and reporting it.

A stack module (users/stack_*.py) holds only its transport: open a stream, hand over its lines (or SDK
chunks), close it, and translate its own exceptions into `StreamFailure`. Everything else is here, once:

- `StreamReader` turns lines or chunks into the `StreamRecord` and says when the user presses Stop;
- `run_stream` / `arun_stream` are the sync/async twins of the one read loop, with the close modes:
  `close` (explicit close), `drop` (break and drop every reference: the garbage collector decides),
  `hold` (keep the response and its socket for `hold_seconds` without reading, then close), `none` (the user
  stops looking but the client reads to the end);
- `StreamingUser` is the abstract Locust user: one stream per task, one `request` event after it ends.

No stream holds the hub: a read whose bytes are already in the socket buffer returns without waiting, so a fast
server (or a flooding one) would keep a read loop running with no turn for any other greenlet: Locust's `-t`,
the Stop timers, `hold`'s end, the other users. Both loops give the hub a turn at least every `HUB_YIELD_S` of
reading, whatever the bytes; `HubTurn` is the one clock, also used inside the SDK's iterator
(users/stack_openai.py), where events it swallows never reach the loop here. The turn is a timer, not
`gevent.sleep(0)`: gevent runs a greenlet woken by sleep(0) from its callback queue, up to 50 of them before it
looks at its timers, so two busy readers taking sleep(0) turns kept a 1 ms ticker waiting ~200 ms; a timer's
turn lets the loop poll and run every due timer first (seen here: p50 1 ms, max 16 ms under load 6 on 2 cores).
The bridge's asyncio loop runs its due timers at every iteration, so `asyncio.sleep(0)` is its turn there; but
the bridge is another OS thread, and a turn of its loop drops and retakes the GIL at once (a poll with no
timeout), which resets the hub thread's wait for a forced switch: a flooding async stream then starved the hub
for up to 1.7 s. So the hub beats (`watch_hub`: a 1 ms timer noting that it ran), and an async turn that finds
the beat stale sleeps for real, GIL released, until the hub has run (at most HANDOVER_MAX_S).
benchmarks/bench_flood.py measures it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar, Protocol

import gevent
import orjson
from gevent import GreenletExit
from gevent.monkey import get_original
from locust import User, task

from stopstorm.metrics.record import INTERRUPTED, StreamRecord
from stopstorm.metrics.redact import redact
from stopstorm.users.options import RunSettings, settings_for
from stopstorm.users.policy import StopPlan
from stopstorm.users.request import StreamRequest
from stopstorm.users.shapes import arrival_clock, open_model_wait
from stopstorm.users.sse import DONE, SSELineDecoder
from stopstorm.users.verdicts import (
    RUNAWAY_EVENT_SLACK,
    RUNAWAY_FACTOR,
    cut_off,
    malformed,
    runaway_events,
    runaway_tokens,
    warn_once,
)

__all__ = [
    "ERROR_BODY_LIMIT",
    "HUB_YIELD_S",
    "REQUEST_TYPE",
    "AsyncStream",
    "AsyncStreamingUser",
    "AsyncTransport",
    "HubTurn",
    "StreamFailure",
    "StreamReader",
    "StreamingUser",
    "SyncStream",
    "SyncStreamingUser",
    "SyncTransport",
    "arun_stream",
    "connect_timed_out",
    "error_text",
    "http_failure",
    "locust_name",
    "report",
    "run_stream",
    "seal",
    "stream_record",
    "watch_hub",
]


HUB_YIELD_S = 0.002
"""A read loop runs at most this long (seconds) without giving the hub a turn (benchmarks/bench_flood.py)."""
_TURN_S = 1e-6  # the timer a turn waits on: due at once, so it costs one loop iteration
HUB_BEAT_S = 0.001  # how often the hub notes that it ran (only once an async stream has started)
HANDOVER_MAX_S = 0.02  # the longest an async turn waits, GIL released, for a starved hub to run
_HANDOVER_STEP_S = 0.0002
_os_sleep: Any = get_original("time", "sleep")  # blocks the bridge's thread itself (gevent's would not)
_hub_beat: list[Any] = [None, 0.0]  # [the beating timer, when the hub last ran (monotonic)]


def watch_hub() -> None:
    """Start the hub's beat (idempotent; from a greenlet of the hub's own thread): async turns read it."""
    if _hub_beat[0] is not None:
        return
    timer = gevent.get_hub().loop.timer(HUB_BEAT_S, HUB_BEAT_S, ref=False)  # never keeps the process alive

    def beat() -> None:
        _hub_beat[1] = time.monotonic()

    _hub_beat[1] = time.monotonic()
    timer.start(beat)
    _hub_beat[0] = timer


def _hand_over() -> None:
    """In the bridge's thread: if the hub has not run lately, sleep with the GIL released until it has (the
    hub thread waiting for the GIL then takes it), at most HANDOVER_MAX_S."""
    seen = _hub_beat[1]
    if _hub_beat[0] is None or time.monotonic() - seen < 2 * HUB_BEAT_S + HUB_YIELD_S:
        return
    deadline = time.monotonic() + HANDOVER_MAX_S
    while _hub_beat[1] == seen and time.monotonic() < deadline:
        _os_sleep(_HANDOVER_STEP_S)


class HubTurn:
    """When a read loop owes the hub (or the bridge's asyncio loop) a turn: `due()` is True at most every
    HUB_YIELD_S seconds of running. One clock read per item (~50 ns) against a turn's ~10 µs."""

    __slots__ = ("_at", "_every")

    def __init__(self) -> None:
        self._every = HUB_YIELD_S
        self._at = time.monotonic() + self._every

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._at:
            return False
        self._at = now + self._every
        return True

    def take(self) -> None:
        """Give the hub its turn now if one is due (sync stacks, under gevent)."""
        if self.due():
            gevent.sleep(_TURN_S)
            self._at = time.monotonic() + self._every  # the turn's own time does not count as reading

    async def atake(self) -> None:
        """The same on the bridge's asyncio loop (async stacks): other tasks and due timers run."""
        if self.due():
            await asyncio.sleep(0)
            _hand_over()  # the hub's thread, if it is waiting for the GIL, gets it now
            self._at = time.monotonic() + self._every


class StreamFailure(Exception):
    """A stream failed; the message says how in words a user reads in Locust's failure table."""


class SyncStream(Protocol):
    def items(self) -> Iterator[Any]:
        """SSE lines (bytes or text, without terminators) or, for SDK stacks, (chunk object, its event data)."""
        ...

    def close(self) -> None: ...


class AsyncStream(Protocol):
    def aitems(self) -> AsyncIterator[Any]: ...

    async def aclose(self) -> None: ...


class SyncTransport(Protocol):
    name: str
    yields_chunks: bool  # True: items are (OpenAI SDK chunk object, its event data), not SSE lines

    def open(self, host: str, request: StreamRequest, record: StreamRecord, timeout: float,
             connect_timeout: float = 10.0) -> SyncStream:
        """Send the request; return once the response headers are in (set record.status). `timeout` is the
        longest wait for a byte, `connect_timeout` for the connection."""
        ...

    def shutdown(self) -> None: ...

    # Optional: `warm(host, api_key)` builds what the first `open` would otherwise build after the send stamp
    # (users call it at start, before any stream); a transport without it builds everything in __init__.


class AsyncTransport(Protocol):
    name: str
    yields_chunks: bool

    async def open(self, host: str, request: StreamRequest, record: StreamRecord, timeout: float,
                   connect_timeout: float = 10.0) -> AsyncStream:
        ...

    async def shutdown(self) -> None: ...


ERROR_BODY_LIMIT = 64 * 1024  # bytes of a 4xx/5xx body a stack reads for the server's message


def connect_timed_out(exc_name: str) -> str:
    """Every stack's words for a connect that timed out: a `connection error`, as a refused one is (the server
    was not reached; described as a read timeout, "no byte for <read timeout> s", it read as a silent server)."""
    return f"connection error: connect timed out (--connect-timeout) ({exc_name})"


def http_failure(status: int, body: bytes | str) -> StreamFailure:
    """The failure of a request the server refused: its status and the message from its (bounded) body."""
    return StreamFailure(f"HTTP {status}: {error_text(body[:ERROR_BODY_LIMIT])}")


def error_text(body: bytes | str, limit: int = 300) -> str:
    """The message inside a vLLM/OpenAI error body (`{"error": {"message": …}}` or `{"message": …}`)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        return text.strip()[:limit] or "(empty body)"
    if isinstance(obj, dict):
        inner = obj.get("error", obj)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])[:limit]
        if isinstance(inner, str):
            return inner[:limit]
    return str(obj)[:limit]


_DONE_BYTES = DONE.encode()


class _StopPressed(BaseException):
    """Raised into a read that is waiting when the user's Stop time comes (a BaseException so stacks' own
    `except Exception` cannot swallow it)."""


class _HeadersLate(BaseException):
    """Raised into `open` when the response headers are later than --headers-timeout (a BaseException so a
    stack's own `except Exception` cannot swallow it)."""


def headers_late(settings: RunSettings) -> StreamFailure:
    return StreamFailure(f"timeout: no response headers within {settings.headers_timeout:g} s")


class StreamReader:
    """One stream's reading: lines or chunks in, record filled, True out when the client stops reading.

    Every event is judged here by the rules of users/verdicts.py, for every stack: SDK stacks hand over each
    chunk with the event data it was built from, and that data is what is judged (so the SDK's own objects
    cannot give another verdict than the same bytes read raw)."""

    __slots__ = ("_decoder", "_event_limit", "_events", "_line_data", "_max_tokens", "_plan", "_read_on",
                 "_stop_at_tokens", "_text_key", "_token_limit", "arrival", "record")

    def __init__(self, record: StreamRecord, plan: StopPlan, read_on: bool, max_tokens: int | None = None) -> None:
        self.record = record
        self._plan = plan
        self._read_on = read_on  # close mode `none`: Stop is recorded but reading goes on to the end
        self._stop_at_tokens = 1 if plan.first_token else plan.tokens
        self._decoder = SSELineDecoder()
        self._line_data = self._decoder.feed_line_data
        self._text_key = "content" if record.endpoint == "chat" else "text"
        self._events = 0  # data events seen ([DONE] aside)
        self._max_tokens = max_tokens
        big = 1 << 62  # no bound without a max_tokens (a test's reader)
        self._token_limit = RUNAWAY_FACTOR * max_tokens if max_tokens else big
        self._event_limit = RUNAWAY_FACTOR * max_tokens + RUNAWAY_EVENT_SLACK if max_tokens else big
        # Where the stream knows when its bytes arrived (users/socket_stamps.py): that time, for the first token
        # and each chunk. Stops, timers and the end keep the read clock: they are what the client did, and when.
        self.arrival: Callable[[], float] | None = None

    def press_stop(self, now: float) -> None:
        rec = self.record
        if rec.stop is None:
            rec.stop = now
            rec.tokens_at_stop = rec.tokens

    def _fail(self, now: float, error: str) -> bool:
        rec = self.record
        rec.error = error
        rec.ended = now
        return True

    def feed_data(self, data: bytes | str) -> bool:
        """One SSE `data` payload from an OpenAI-style stream (bytes straight from the line, or text)."""
        now = time.monotonic()
        rec = self.record
        if data in (DONE, _DONE_BYTES):
            rec.done = True
            rec.ended = now
            return True
        self._events += 1
        if self._events > self._event_limit and self._max_tokens:
            return self._fail(now, runaway_events(self._events, self._max_tokens))
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            if not isinstance(data, bytes):
                return self._fail(now, malformed("JSONDecodeError (not JSON)", data))
            try:  # invalid UTF-8 is replaced, as SSE decodes it (and as every text path already did)
                obj = orjson.loads(data.decode("utf-8", "replace"))
            except orjson.JSONDecodeError:
                return self._fail(now, malformed("JSONDecodeError (not JSON)", data))
        if type(obj) is not dict:
            return self._fail(now, malformed("chunk is not a JSON object", data))
        error = obj.get("error")
        if error:  # vLLM follows it with [DONE]; the stream has failed, so reading stops here
            body = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
            return self._fail(now, f"server error mid-stream: {error_text(body)}")
        if rec.server_id is None:
            sid = obj.get("id")
            rec.server_id = sid if isinstance(sid, str) else None
        usage = obj.get("usage")
        choices = obj.get("choices")
        text: str | None = None
        finish: str | None = None
        if choices:
            choice = choices[0] if type(choices) is list else None
            if type(choice) is not dict:
                return self._fail(now, malformed("choices is not a list of objects", data))
            if self._text_key == "content":
                delta = choice.get("delta")  # none in some servers' last chunk: no text
                value = delta.get("content") if type(delta) is dict else None
            else:
                value = choice.get("text")
            text = value if type(value) is str else None
            reason = choice.get("finish_reason")
            finish = reason if type(reason) is str else None
        elif choices is None and not usage:  # not an OpenAI chunk (a usage chunk has usage, and choices [])
            return self._fail(now, malformed("chunk without choices", data))
        elif choices is not None and type(choices) is not list:
            return self._fail(now, malformed("choices is not a list of objects", data))
        completion = prompt = None
        if type(usage) is dict:
            completion, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
            completion = completion if type(completion) is int else None
            prompt = prompt if type(prompt) is int else None
        return self._on_chunk(now, text, completion, prompt, finish)

    def feed_chunk(self, item: tuple[Any, str]) -> bool:
        """One OpenAI SDK chunk and the event data the SDK built it from: the data is judged, as for raw stacks
        (the chunk object is the SDK's own cost, built and dropped as its users' are)."""
        return self.feed_data(item[1])

    def _on_chunk(self, now: float, text: str | None, completion: int | None, prompt: int | None,
                  finish: str | None) -> bool:
        rec = self.record
        if prompt is not None:
            rec.prompt_tokens = prompt
        if finish:
            rec.finish_reason = finish
        if completion is not None:
            rec.usage_tokens = completion
        if not text:
            # A count without text: the final usage chunk, or a token vLLM's detokenizer held back (it ends inside
            # a UTF-8 character) in the chunk that ends the stream. Only a stream still being read gets here, so
            # after a Stop that reads on (`none`) it counts too.
            if completion is not None:
                rec.tokens = max(rec.tokens, completion)
            return False
        at = now if self.arrival is None else self.arrival()
        if rec.first_token is None:
            rec.first_token = at
        rec.tokens = completion if completion is not None else rec.tokens + 1
        rec.chunk_times.append(at)
        rec.chunk_tokens.append(rec.tokens)
        if "\ufffd" in text:
            rec.replaced_chunks += 1
            warn_once("replaced", "the server sent invalid UTF-8 in content (decoded with replacement, as SSE "
                      "does; tokens counted; the records' replaced_chunks say which streams)")
        if rec.tokens > self._token_limit and self._max_tokens:
            return self._fail(now, runaway_tokens(rec.tokens, self._max_tokens))
        if rec.stop is None:
            plan = self._plan
            if (self._stop_at_tokens is not None and rec.tokens >= self._stop_at_tokens) or (
                plan.seconds is not None and now - rec.sent >= plan.seconds
            ):
                self.press_stop(now)
                return not self._read_on
        return False

    def feed(self, item: Any, chunks: bool) -> bool:
        if self.record.stop is not None and not self._read_on:
            return True  # Stop was pressed by a timer while we waited: this item is not read
        if chunks:
            return self.feed_chunk(item)
        data = self._line_data(item)  # inline, one call shorter: this runs twice per chunk
        return False if data is None else self.feed_data(data)

    def finish_unended(self, now: float) -> None:
        """The body ended: its last event is flushed (one without its blank line still counts), then a stream
        without [DONE] is cut off, recorded as a failure."""
        rec = self.record
        last = self._decoder.flush()
        stopped_with_last = (last is not None and not (rec.stop is not None and not self._read_on)
                             and self.feed_data(last.data) and rec.error is None and not rec.done)
        rec.ended = now
        if not rec.done and rec.error is None and not stopped_with_last:  # (a Stop at the last event: the user's)
            rec.error = cut_off(self._events, rec.tokens)


def _interrupting_stop(plan: StopPlan, mode: str) -> float | None:
    """Seconds from send until a time-based Stop that interrupts the read: only for `close`.

    A Stop button's handler that closes the stream cuts a waiting read short, so for `close` the deadline
    raises into the read and the stream is then closed. `hold` and `drop` only stop reading: their Stop is
    pressed by a timer that raises nothing (several libraries close the connection when a read is
    interrupted, which would turn a hold into a close), and the loop leaves at its next item.
    """
    return plan.seconds if mode == "close" else None


def _quiet_stop(plan: StopPlan, mode: str) -> float | None:
    """Seconds from send until a time-based Stop that only records itself (hold, drop)."""
    return plan.seconds if mode in ("hold", "drop") else None


def run_stream(transport: SyncTransport, settings: RunSettings, request: StreamRequest, record: StreamRecord,
               plan: StopPlan) -> None:
    """The read loop for sync stacks (under gevent). Never raises but to a killed greenlet, and always closes
    the stream it opened (unless the close mode is `drop`): the record says what happened."""
    mode = record.close_mode
    reader = StreamReader(record, plan, read_on=mode == "none", max_tokens=request.body.get("max_tokens"))
    stream: SyncStream | None = None
    deadline = _interrupting_stop(plan, mode)
    timeout = gevent.Timeout(deadline, _StopPressed) if deadline is not None else None
    quiet = _quiet_stop(plan, mode)
    watcher = gevent.get_hub().loop.timer(quiet) if quiet is not None else None
    record.wall_start, record.sent = time.time(), time.monotonic()
    try:
        try:
            if timeout is not None:
                timeout.start()
            if watcher is not None:
                watcher.start(lambda: reader.press_stop(time.monotonic()))
            try:
                with gevent.Timeout(settings.headers_timeout, _HeadersLate):
                    stream = transport.open(settings.host, request, record, settings.read_timeout,
                                            connect_timeout=settings.connect_timeout)
            except _HeadersLate:
                raise headers_late(settings) from None
            reader.arrival = getattr(stream, "arrival", None)
            turn = HubTurn()
            for item in stream.items():
                if reader.feed(item, transport.yields_chunks):
                    break
                turn.take()  # however fast the bytes come: timers, Stops and -t keep their time
            else:
                reader.finish_unended(time.monotonic())
        except _StopPressed:
            reader.press_stop(time.monotonic())
        except StreamFailure as exc:
            record.error = str(exc)
            record.ended = time.monotonic()
        except Exception as exc:  # a stack bug must not kill the user: record it
            record.error = f"unexpected {type(exc).__name__}: {exc}"
            record.ended = time.monotonic()
        finally:
            if timeout is not None:
                timeout.close()
            if watcher is not None:
                watcher.close()
        if stream is not None and record.stop is not None:
            if mode == "drop":
                stream = None  # every reference gone: what happens to the socket is the library's business
            elif mode == "hold":
                gevent.sleep(settings.hold_seconds)
    finally:  # also when Locust kills the user mid-read or mid-hold
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
            if record.stop is not None:
                record.closed = time.monotonic()


async def arun_stream(transport: AsyncTransport, settings: RunSettings, request: StreamRequest,
                      record: StreamRecord, plan: StopPlan) -> None:
    """The async twin of `run_stream`, run on the bridge's event loop."""
    mode = record.close_mode
    reader = StreamReader(record, plan, read_on=mode == "none", max_tokens=request.body.get("max_tokens"))
    stream: AsyncStream | None = None
    deadline = _interrupting_stop(plan, mode)
    quiet = _quiet_stop(plan, mode)
    handle = (asyncio.get_running_loop().call_later(quiet, lambda: reader.press_stop(time.monotonic()))
              if quiet is not None else None)
    record.wall_start, record.sent = time.time(), time.monotonic()
    try:
        try:
            async with asyncio.timeout(deadline):
                try:
                    async with asyncio.timeout(settings.headers_timeout):  # only its own expiry raises here
                        stream = await transport.open(settings.host, request, record, settings.read_timeout,
                                                      connect_timeout=settings.connect_timeout)
                except TimeoutError:
                    raise headers_late(settings) from None
                reader.arrival = getattr(stream, "arrival", None)
                turn = HubTurn()
                async for item in stream.aitems():
                    if reader.feed(item, transport.yields_chunks):
                        break
                    await turn.atake()
                else:
                    reader.finish_unended(time.monotonic())
        except TimeoutError:
            if deadline is None:
                record.error = "timeout"
                record.ended = time.monotonic()
            else:
                reader.press_stop(time.monotonic())
        except StreamFailure as exc:
            record.error = str(exc)
            record.ended = time.monotonic()
        except Exception as exc:
            record.error = f"unexpected {type(exc).__name__}: {exc}"
            record.ended = time.monotonic()
        finally:
            if handle is not None:
                handle.cancel()
        if stream is not None and record.stop is not None:
            if mode == "drop":
                stream = None
            elif mode == "hold":
                await asyncio.sleep(settings.hold_seconds)
    finally:  # also when the greenlet is killed and the bridge cancels this task
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.aclose()
            if record.stop is not None:
                record.closed = time.monotonic()


def stream_record(stack: str, request: StreamRequest, mode: str, plan: StopPlan) -> StreamRecord:
    """A new stream's record, before it is sent (every stream's, a Locust user's or a single one's)."""
    return StreamRecord(stack=stack, close_mode=mode, endpoint=request.endpoint, request_id=request.request_id,
                        stop_plan=str(plan), wall_start=time.time(), sent=time.monotonic())


def seal(record: StreamRecord) -> StreamRecord:
    """The stream has ended: what it records in words is made safe to write (no API key, no password: a server
    may echo the key it was sent in its error). Every stream passes here before anyone sees its record."""
    if record.error:
        record.error = redact(record.error)
    return record


REQUEST_TYPE = "stream"  # Locust's Type column: 8 characters wide, so the stack goes into the Name column


def locust_name(record: StreamRecord) -> str:
    """The stream's row in Locust's tables: its stack, then what happened, in the report's words (a stream
    nobody stopped is "not stopped", whatever close mode it would have used)."""
    if record.error == INTERRUPTED:
        return f"{record.stack} cut by the run's end"
    return f"{record.stack} {record.close_mode} stop" if record.stopped else f"{record.stack} not stopped"


def report(environment: Any, record: StreamRecord) -> None:
    """Fire Locust's `request` event for the stream; the record rides in `context`.

    One event a stream, so Locust's Aggregated row is every stream: its response time is send → Stop (or the
    stream's end), its size the tokens the user read. The type is `stream` (Locust's Type column holds 8
    characters; a stack name there pushed the row out of line) and the name says the stack and the outcome.
    TTFT is not a Locust row (it would average first tokens with whole streams): the summary block after the run,
    the HTML report and the web UI's live page show it. A stream the run's end cut short is its own row, not a
    Locust failure: the server did nothing wrong, and Locust's exit code (1 on any failure) must keep meaning
    that the server failed.
    """
    seal(record)
    duration = record.duration
    exc = StreamFailure(record.error) if record.error not in (None, INTERRUPTED) else None
    environment.events.request.fire(
        request_type=REQUEST_TYPE, name=locust_name(record),
        response_time=(duration if duration is not None else time.monotonic() - record.sent) * 1e3,
        response_length=record.tokens_read, exception=exc, context={"record": record},
    )


class StreamingUser(User):
    """A chat user who streams completions and sometimes presses Stop; subclasses pick the client stack."""

    abstract = True
    stack: ClassVar[str] = ""

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.rng = random.Random()
        self.settings: RunSettings | None = None

    def wait_time(self) -> float:
        if arrival_clock(self.environment) is not None:
            return 0.0  # open model: stream() waits for this user's next Poisson arrival instead
        think = self._settings().think_time
        return self.rng.expovariate(1.0 / think) if think > 0 else 0.0

    def _settings(self) -> RunSettings:
        if self.settings is None:
            self.settings = settings_for(self.environment, self.host or "")  # no host: preflight says so
        return self.settings

    def new_stream(self) -> tuple[StreamRequest, StreamRecord, StopPlan]:
        settings = self._settings()
        request = settings.requests.build(self.rng)
        plan = settings.stop_policy.draw(self.rng)
        mode = "none" if plan.never else settings.close_mix.draw(self.rng)
        return request, stream_record(self.stack, request, mode, plan), plan

    def stream_once(self, request: StreamRequest, record: StreamRecord, plan: StopPlan) -> None:
        raise NotImplementedError

    @task
    def stream(self) -> None:
        open_model_wait(self.environment)
        request, record, plan = self.new_stream()
        try:
            self.stream_once(request, record, plan)
        except GreenletExit:  # the run is ending (run time, Stop, a signal): this stream is recorded too
            if record.ended is None and record.error is None and record.stop is None:
                record.error, record.ended = INTERRUPTED, time.monotonic()
            report(self.environment, record)
            raise
        report(self.environment, record)


def _warm(transport: Any, settings: RunSettings) -> None:
    warm = getattr(transport, "warm", None)
    if warm is not None:
        warm(settings.host, settings.api_key)


class SyncStreamingUser(StreamingUser):
    """A user whose client blocks (cooperatively, under gevent): requests, httpx, openai, FastHttp."""

    abstract = True
    transport_class: ClassVar[type[Any]]

    def on_start(self) -> None:
        settings = self._settings()
        self.transport: SyncTransport = self.transport_class(insecure=settings.insecure)
        _warm(self.transport, settings)

    def on_stop(self) -> None:
        self.transport.shutdown()

    def stream_once(self, request: StreamRequest, record: StreamRecord, plan: StopPlan) -> None:
        run_stream(self.transport, self._settings(), request, record, plan)


class AsyncStreamingUser(StreamingUser):
    """A user whose client is asyncio's (httpx.AsyncClient, AsyncOpenAI), run through the one bridge.

    The transport is created on the bridge's loop, as async clients must be.
    """

    abstract = True
    transport_class: ClassVar[type[Any]]

    def on_start(self) -> None:
        from stopstorm.users.bridge import get_bridge

        self.bridge = get_bridge()
        insecure = self._settings().insecure
        self.transport: AsyncTransport = self.bridge.run(lambda: self._create_transport(insecure))

    async def _create_transport(self, insecure: bool) -> AsyncTransport:
        transport = self.transport_class(insecure=insecure)
        _warm(transport, self._settings())
        return transport

    def on_stop(self) -> None:
        self.bridge.run(self.transport.shutdown, timeout=10)

    def stream_once(self, request: StreamRequest, record: StreamRecord, plan: StopPlan) -> None:
        settings = self._settings()
        watch_hub()  # (here, in the hub's thread: the stream's turns on the bridge read its beat)
        self.bridge.run(lambda: arun_stream(self.transport, settings, request, record, plan))
