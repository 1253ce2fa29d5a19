"""One verdict per server behaviour, whatever the client stack: the words a failure is recorded with, decided once.

Every stack hands its response's status and headers to `response_failure` before it reads a byte of the body,
and the streaming core (users/core.py) judges every event by the rules below, so the same bytes get the same
verdict on all six stacks (docs/guides/hostile-input.md lists them):

- a status other than 200 fails: `HTTP 404: <the server's message>` (4xx/5xx, the body read for its message),
  `HTTP 307 redirect to <Location>` (no stack follows a redirect: a run measures the server `--host` names, and a
  key must not follow a redirect to another host), `HTTP 204: not an event stream …` (another 2xx);
- a 200 whose Content-Type is not `text/event-stream` fails naming it (`text/html`, `application/json` from a
  server that ignored `stream: true`, or none at all for an empty 200);
- a body in a Content-Encoding the request did not ask for fails naming it (every stack sends
  `Accept-Encoding: identity`: a compressed stream would hold tokens back in the decompressor);
- invalid UTF-8 is decoded with replacement, as the SSE spec says: the tokens count, and the record counts the
  chunks whose text holds U+FFFD (`replaced_chunks`, warned once per run);
- a chunk without `delta` (or `text`), or with `choices: []` (a usage chunk), carries no text and is fine; a
  chunk with neither `choices` nor `usage` is not an OpenAI chunk: `malformed stream: chunk without choices: …`;
- the body's end flushes the last event (one without its blank line still counts); a stream that ends
  without `data: [DONE]` is `stream cut off: the server closed it before data: [DONE]` (with how far it got);
- a stream read well past its `max_tokens` (more than RUNAWAY_FACTOR × max_tokens tokens, or events beyond
  RUNAWAY_FACTOR × max_tokens + RUNAWAY_EVENT_SLACK) is stopped and closed: `server ignored max_tokens: …`,
  warned once per run, so a server that never stops cannot grow the load generator's memory without end.
"""

from __future__ import annotations

import logging

__all__ = ["RUNAWAY_EVENT_SLACK", "RUNAWAY_FACTOR", "cut_off", "excerpt", "malformed", "response_failure",
           "runaway_events", "runaway_tokens", "warn_once"]

_log = logging.getLogger("stopstorm")

RUNAWAY_FACTOR = 2
"""A stream is stopped once it has given more than this many times its max_tokens (tokens, or events)."""
RUNAWAY_EVENT_SLACK = 64
"""Events a stream may send beyond RUNAWAY_FACTOR × max_tokens (role, finish and usage chunks, keep-alives)."""

EVENT_STREAM = "text/event-stream"
_EXCERPT = 120
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log `message` the first time `key` is seen in this process (one warning per run, not one per stream)."""
    if key not in _warned:
        _warned.add(key)
        _log.warning("stopstorm: %s", message)


def excerpt(data: bytes | str) -> str:
    """The start of an event's data as text, quoted (the same on every stack, bytes or text)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes | bytearray) else data
    return repr(text[:_EXCERPT])


def malformed(what: str, data: bytes | str) -> str:
    return f"malformed stream: {what}: {excerpt(data)}"


def response_failure(status: int, content_type: str | None, content_encoding: str | None,
                     location: str | None = None) -> str | None:
    """Why a response with this status (< 400) and these headers is not a stream to read, or None if it is."""
    if 300 <= status < 400:
        return (f"HTTP {status} redirect to {location or '(no Location)'}: not followed (no stack follows "
                "redirects; give the server's own URL as --host)")
    media = (content_type or "").partition(";")[0].strip().lower()
    if status != 200:
        return f"HTTP {status}: not an event stream (expected 200 with Content-Type {EVENT_STREAM})"
    if media != EVENT_STREAM:
        named = f"Content-Type {content_type.strip()}" if content_type and content_type.strip() else "no Content-Type"
        return f"not an event stream: HTTP 200 with {named} (expected {EVENT_STREAM})"
    encoding = (content_encoding or "").strip().lower()
    if encoding not in ("", "identity"):
        return (f"unrequested Content-Encoding {content_encoding}: the request asked for identity "
                "(Accept-Encoding: identity)")
    return None


def cut_off(events: int, tokens: int) -> str:
    """A body that ended without [DONE]."""
    how = "no event at all" if events == 0 else f"after {events} event{'s' if events != 1 else ''}, {tokens} tokens"
    return f"stream cut off: the server closed it before data: [DONE] ({how})"


def runaway_tokens(tokens: int, max_tokens: int) -> str:
    warn_once("runaway", f"the server ignores max_tokens ({tokens} tokens in one stream against max_tokens "
              f"{max_tokens}); such streams are stopped at {RUNAWAY_FACTOR} × max_tokens and failed")
    return (f"server ignored max_tokens: {tokens} tokens read against max_tokens {max_tokens} (stopped reading past "
            f"{RUNAWAY_FACTOR} × max_tokens)")


def runaway_events(events: int, max_tokens: int) -> str:
    warn_once("runaway", f"the server ignores max_tokens ({events} events in one stream against max_tokens "
              f"{max_tokens}); such streams are stopped and failed")
    return (f"server ignored max_tokens: {events} events read against max_tokens {max_tokens} (stopped reading past "
            f"{RUNAWAY_FACTOR} × max_tokens + {RUNAWAY_EVENT_SLACK} events)")
