"""Server-Sent-Events decoding for OpenAI-style streams (vLLM /v1/chat/completions, /v1/completions).

Every client stack (requests, httpx, FastHttp, ...) hands its bytes or lines to this one parser, so no stack
can parse the stream differently from another and skew the comparison between them. It is a push decoder with
no sockets, no clocks and no I/O: the caller owns the transport and the timestamps.

Parsing follows the WHATWG rules (HTML Living Standard, "Server-sent events", "Parsing an event stream"):

- lines end with CRLF, LF or CR, also when a CRLF is split between two ``decode()`` calls;
- a UTF-8 byte order mark at the very start of the stream is skipped; bytes become text only at line
  boundaries, so a multi-byte character split between chunks decodes correctly (invalid UTF-8 is replaced);
- ``field: value`` lines: one space after the colon is stripped; a line without a colon is a field with an
  empty value; lines starting with ``:`` are comments (keep-alives) and unknown fields are ignored;
- a blank line dispatches the event; an event with no ``data`` line is not dispatched;
- ``retry`` is kept only when it is all ASCII digits; ``id`` persists from event to event (the spec's "last
  event ID") and one containing NUL is ignored.

One deliberate leniency: the spec drops an event that the stream ends before its blank line; ``flush()``
returns it, because a load tester must count every token the server did send.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["DONE", "SSEDecoder", "SSEEvent", "SSELineDecoder", "parse_sse_lines"]

DONE = "[DONE]"
"""The ``data`` of the sentinel event that ends an OpenAI-style stream."""

_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event. Treat it as read-only (not frozen only because that makes it 3x slower to build).

    ``data`` is the event's data lines joined with ``"\\n"``; ``event`` is None for the default type
    ("message"); ``id`` is the last event id seen in the stream so far (None if none); ``retry`` is the
    reconnection time in ms given in this event's own lines (None if none).
    """

    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None


class _EventBuffer:
    """Field state shared by both decoders: the lines of the event being built, and the last event id."""

    __slots__ = ("_at_start", "_data", "_event", "_id", "_retry")

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._at_start = True

    def _field(self, line: str) -> None:
        """Apply one non-blank line (the hot ``data: ...`` case is inlined by the callers)."""
        if line[0] == ":":
            return  # comment / keep-alive
        name, _, value = line.partition(":")  # no colon: the whole line is the name, the value is ""
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value or None
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)

    def _dispatch(self) -> SSEEvent | None:
        """A blank line: build the event if it has data, and start a new one either way."""
        data = self._data
        event = SSEEvent("\n".join(data), self._event, self._id, self._retry) if data else None
        data.clear()
        self._event = self._retry = None
        return event

    def _reset(self) -> None:
        self._data.clear()
        self._event = self._id = self._retry = None
        self._at_start = True


class SSEDecoder(_EventBuffer):
    """Push decoder over raw bytes: ``decode(chunk)`` for each chunk as it arrives, ``flush()`` at the end.

    Chunks may be split anywhere (inside a line, a CRLF or a UTF-8 character). ``flush()`` also resets the
    decoder, so it can be reused for the next stream.
    """

    __slots__ = ("_head", "_skip_lf")

    def __init__(self) -> None:
        super().__init__()
        self._head: list[bytes] = []  # the start of an unfinished line (no line terminator in it)
        self._skip_lf = False  # the last chunk ended with CR: a LF starting the next one ends nothing

    def decode(self, data: bytes) -> list[SSEEvent]:
        """Feed the next chunk of the stream; return the events it completes (often none or one)."""
        if self._at_start or self._skip_lf:
            data = self._edge(data)
        if 13 in data:  # CR; an int membership test is a memchr, 10x faster than b"\r" in data
            if data[-1] == 13:
                self._skip_lf = True
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = data.rfind(b"\n")
        if (  # fast path: the chunk is exactly one whole "data: ...\n\n" event and nothing is pending
            not self._head
            and end == len(data) - 1
            and data.find(b"\n") == end - 1
            and data.startswith(b"data:")
            and not self._data
        ):
            value = data[6 : end - 1] if data[5] == 32 else data[5 : end - 1]
            event = SSEEvent(value.decode("utf-8", "replace"), self._event, self._id, self._retry)
            self._event = self._retry = None
            return [event]
        if end < 0:
            if data:
                self._head.append(data)
            return []
        head = self._head
        if head:
            head.append(data[:end])
            text = b"".join(head).decode("utf-8", "replace")
            head.clear()
        else:
            text = data[:end].decode("utf-8", "replace")
        if end != len(data) - 1:
            head.append(data[end + 1 :])

        # Inlined copy of _field's hot cases (blank line, data line); see _EventBuffer for the rules.
        events: list[SSEEvent] = []
        lines = self._data
        for line in text.split("\n"):
            if not line:
                if lines:
                    events.append(SSEEvent("\n".join(lines), self._event, self._id, self._retry))
                    lines.clear()
                self._event = self._retry = None
            elif line.startswith("data:"):
                lines.append(line[6:] if line.startswith(" ", 5) else line[5:])
            else:
                self._field(line)
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: return the last event if it lacked its blank line, and reset the decoder."""
        if self._head:
            line = b"".join(self._head).decode("utf-8", "replace")
            self._head.clear()
            if line:
                self._field(line)
        event = self._dispatch()
        self._reset()
        self._skip_lf = False
        return [event] if event is not None else []

    def _edge(self, data: bytes) -> bytes:
        """The rare cases: the first bytes of the stream (BOM), or a chunk after one that ended with CR."""
        if self._at_start:
            if self._head:
                data = b"".join(self._head) + data
                self._head.clear()
            if len(data) < 3 and _BOM.startswith(data):
                if data:
                    self._head.append(data)  # maybe a BOM split over chunks: wait for more
                return b""
            self._at_start = False
            return data[3:] if data.startswith(_BOM) else data
        if not data:
            return data
        self._skip_lf = False
        return data[1:] if data[0] == 10 else data


class SSELineDecoder(_EventBuffer):
    """Line-level decoder, for clients that already split the stream into lines (``iter_lines()``, readline).

    Feed each line without its terminator (a single trailing LF, CRLF or CR is tolerated and removed). The
    splitter must end lines at CRLF, LF and CR and nowhere else, so feed bytes: ``str.splitlines()`` (as in
    ``requests``' ``iter_lines(decode_unicode=True)``) also splits at U+2028, U+0085 and other characters
    that model output can contain. ``iter_lines()`` also yields an extra blank line when a CRLF is split
    between reads, which ends a multi-line event early (harmless for vLLM's one-line events); use
    ``SSEDecoder`` on raw chunks where that matters.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        super().__init__()
        # The value of a lone `data: ` line not yet ended by its blank line, kept as given (bytes stay bytes:
        # orjson parses them without a decode). Only `feed_line_data` sets it; every other path folds it in.
        self._pending: bytes | str | None = None

    def feed_line_data(self, line: bytes | str) -> bytes | str | None:
        """Feed one line; return the ``data`` of the event a blank line completes, else None.

        The hot path of a load tester: an OpenAI-style event is one ``data: {...}`` line and a blank line,
        and for it this returns the payload as it came (bytes in, bytes out), with no decode, no join and
        no `SSEEvent`. Any other line takes `feed_line`'s full rules, so the result is the same either way
        (the one difference: invalid UTF-8 in a fast-path payload reaches the caller as bytes, not replaced).
        """
        pending = self._pending
        if not line:
            if pending is not None:  # a one-line event: the common case
                self._pending = None
                self._event = self._retry = None
                return pending
            self._at_start = False
            event = self._dispatch()
            return None if event is None else event.data
        if pending is None and not self._data and not self._at_start:
            if isinstance(line, bytes):
                if line.startswith(b"data: ") and line[-1] not in (10, 13):
                    self._pending = line[6:]
                    return None
            elif line.startswith("data: ") and line[-1] not in "\r\n":
                self._pending = line[6:]
                return None
        if pending is not None:
            self._fold_pending()
        event = self.feed_line(line)
        return None if event is None else event.data

    def _fold_pending(self) -> None:
        pending = self._pending
        self._pending = None
        if pending is not None:
            self._data.append(pending.decode("utf-8", "replace") if isinstance(pending, bytes) else pending)

    def feed_line(self, line: bytes | str) -> SSEEvent | None:
        """Feed one line; return the event that a blank line completes, else None."""
        if self._pending is not None:  # after feed_line_data's fast path
            self._fold_pending()
        if not isinstance(line, str):
            line = line.decode("utf-8", "replace")
        if self._at_start:
            self._at_start = False
            if line[:1] == "\ufeff":
                line = line[1:]
        if line.startswith("data:"):
            if line[-1] in "\r\n":
                line = _strip_eol(line)
            self._data.append(line[6:] if line.startswith(" ", 5) else line[5:])
            return None
        if line and line[-1] in "\r\n":
            line = _strip_eol(line)
        if not line:
            return self._dispatch()
        self._field(line)
        return None

    def flush(self) -> SSEEvent | None:
        """End of stream: return the last event if it lacked its blank line, and reset the decoder."""
        self._fold_pending()
        event = self._dispatch()
        self._reset()
        return event


def parse_sse_lines(lines: Iterable[bytes | str]) -> Iterator[SSEEvent]:
    """Yield the events of a stream given as lines (e.g. ``response.iter_lines()``), flushing at the end."""
    decoder = SSELineDecoder()
    feed = decoder.feed_line
    for line in lines:
        event = feed(line)
        if event is not None:
            yield event
    event = decoder.flush()
    if event is not None:
        yield event


def _strip_eol(line: str) -> str:
    return line[:-2] if line.endswith("\r\n") else line[:-1]
