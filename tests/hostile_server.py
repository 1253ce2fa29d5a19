"""A raw-socket server that misbehaves on purpose, one way per URL: what a load tester meets behind a broken proxy,
a half-compatible server or a bad deploy. Its own process (plain threads, no gevent), started by the tests:

    python tests/hostile_server.py        # prints "hostile server listening on http://127.0.0.1:PORT"

`POST /b/<behaviour>/v1/chat/completions` answers as BEHAVIOURS[<behaviour>] says (an OpenAI-style chat stream
of TOKENS tokens, broken in its own way); `GET /b/<behaviour>/v1/models` lists the model `llm`, so a base URL
`http://127.0.0.1:PORT/b/<behaviour>` passes stopstorm's start-up check. `POST /mix/...` takes the behaviours
in turn (for a whole Locust run). `GET /_received` is the truth: every POST received, in order, as
[behaviour, X-Request-Id]. Everything is written with raw `sendall`, so every framing, cut and reset is exactly
what is asked for; each connection serves one request and is then closed (or reset, or left hanging).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

TOKENS = 5  # content tokens in a well-formed stream
HANG_S = 30.0  # how long a "silent" behaviour holds the connection (the client's timeout ends it first)
RUNAWAY_LIMIT = 100_000  # chunks a runaway stream sends at most if nobody stops reading (a bound for the test)
FLOOD_TOKENS = 20_000  # content chunks a flood sends, as fast as the socket takes them (read with max_tokens >= it)
FLOOD_BIG_TOKENS = 200_000  # flood-big: seconds of reading for the fast raw stacks too

Handler = Callable[["Conn"], None]


def chunk(content: str | None = None, *, role: bool = False, finish: str | None = None, usage: int | None = None,
          delta: bool = True, raw_content: bytes | None = None) -> bytes:
    """One chat.completion.chunk's JSON (bytes), vLLM's shape."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if delta:
        d: dict[str, Any] = {}
        if role:
            d["role"] = "assistant"
            d["content"] = ""
        if content is not None:
            d["content"] = content
        choice["delta"] = d
    obj: dict[str, Any] = {"id": "chatcmpl-hostile", "object": "chat.completion.chunk", "created": 0, "model": "llm",
                           "choices": [choice]}
    if usage is not None:
        obj["usage"] = {"prompt_tokens": 3, "completion_tokens": usage, "total_tokens": 3 + usage}
    out = json.dumps(obj, ensure_ascii=False).encode()
    if raw_content is not None:
        out = out.replace(b'"@RAW@"', b'"' + raw_content + b'"')
    return out


def event(data: bytes, eol: bytes = b"\n") -> bytes:
    return b"data: " + data + eol + eol


def stream_events(tokens: int = TOKENS) -> list[bytes]:
    """A well-formed stream's events: the role chunk, TOKENS content chunks, the finish chunk, [DONE]."""
    return [event(chunk(role=True)), *(event(chunk(f" t{i}")) for i in range(tokens)),
            event(chunk(finish="length")), event(b"[DONE]")]


SSE_HEADERS = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n"


class Conn:
    """One accepted connection and the request read from it."""

    def __init__(self, sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        self.sock = sock
        self.path = path
        self.headers = headers

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def head(self, extra: bytes = b"", status: bytes = b"HTTP/1.1 200 OK", ctype: bytes | None = b"text/event-stream"
             ) -> None:
        lines = [status]
        if ctype is not None:
            lines.append(b"Content-Type: " + ctype)
        lines.append(b"Connection: close")
        self.send(b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n")

    def sse(self, body: bytes) -> None:
        self.head()
        self.send(body)

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0), not FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def hang(self, seconds: float = HANG_S) -> None:
        """Send nothing more until the client goes (or `seconds` pass)."""
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(1024):
                pass
        except OSError:
            pass

    def status(self, code: int, body: bytes, ctype: bytes = b"application/json", extra: bytes = b"") -> None:
        reason = {204: b"No Content", 307: b"Temporary Redirect", 400: b"Bad Request", 401: b"Unauthorized",
                  429: b"Too Many Requests", 500: b"Internal Server Error", 503: b"Service Unavailable"}[code]
        self.send(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
                  % (code, reason, ctype, len(body), extra) + body)


def _ok(c: Conn) -> None:
    c.sse(b"".join(stream_events()))


def _reframed(transform: Callable[[bytes], bytes]) -> Handler:
    return lambda c: c.sse(transform(b"".join(stream_events())))


def _comments(c: Conn) -> None:
    c.sse(b": keep-alive\n\n" + b"".join(b": ping\n" + e + b"\n" for e in stream_events()))


def _multiline(c: Conn) -> None:
    events = []
    for e in stream_events()[:-1]:
        data = e[len(b"data: "):-2]
        cut = data.index(b'"choices"')
        events.append(b"data: " + data[:cut] + b"\ndata: " + data[cut:] + b"\n\n")
    c.sse(b"".join(events) + b"data: [DONE]\n\n")


def _bom(c: Conn) -> None:
    c.sse(b"\xef\xbb\xbf" + b"".join(stream_events()))


def _split_writes(c: Conn) -> None:
    c.head()
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = b"".join(stream_events())
    for i in range(0, len(body), 29):
        c.send(body[i:i + 29])
        time.sleep(0.002)


def _utf8_split(c: Conn) -> None:
    c.head()
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    events = [event(chunk(role=True)), *(event(chunk(f"你好{i}")) for i in range(TOKENS)), event(chunk(finish="stop")),
              event(b"[DONE]")]
    for e in events:
        at = e.index("你".encode()) + 1 if "你".encode() in e else len(e) // 2  # inside the character
        c.send(e[:at])
        time.sleep(0.005)
        c.send(e[at:])


def _fields(c: Conn) -> None:
    c.sse(b"".join(b"event: message\nid: %d\nretry: 1000\n" % i + e for i, e in enumerate(stream_events())))


def _done_no_blank(c: Conn) -> None:
    c.sse(b"".join(stream_events()[:-1]) + b"data: [DONE]")


def _done_one_newline(c: Conn) -> None:
    c.sse(b"".join(stream_events()[:-1]) + b"data: [DONE]\n")


def _usage(c: Conn) -> None:  # two tokens a chunk, cumulative usage in every chunk, then a usage-only chunk
    events = [event(chunk(role=True, usage=0))]
    events += [event(chunk(f" t{i} u{i}", usage=2 * (i + 1))) for i in range(TOKENS)]
    events.append(event(chunk(finish="length", usage=2 * TOKENS)))
    usage_only = json.loads(chunk(usage=2 * TOKENS))
    usage_only["choices"] = []
    events += [event(json.dumps(usage_only).encode()), event(b"[DONE]")]
    c.sse(b"".join(events))


def _no_delta(c: Conn) -> None:
    events = stream_events()
    events.insert(-1, event(chunk(finish="length", delta=False)))
    c.sse(b"".join(events))


def _invalid_utf8(c: Conn) -> None:
    events = stream_events()
    events[2] = event(chunk("@RAW@", raw_content=b"bad \xff\xfe bytes"))
    c.sse(b"".join(events))


def _chunked(c: Conn, cut: bool = False) -> None:
    c.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close"
           b"\r\n\r\n")
    events = stream_events()
    for e in events[:4] if cut else events:
        c.send(b"%x\r\n%s\r\n" % (len(e), e))
    if not cut:
        c.send(b"0\r\n\r\n")


def _http10(c: Conn) -> None:
    c.send(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + b"".join(stream_events()))


def _keepalive_after_done(c: Conn) -> None:
    c.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    for e in stream_events():
        c.send(b"%x\r\n%s\r\n" % (len(e), e))
    c.hang(3.0)  # the body never ends: a client must stop at [DONE], not wait for the end


def _done_then_garbage(c: Conn) -> None:
    c.sse(b"".join(stream_events()) + b"data: {not json after the end\n\n" + event(chunk(" extra")))


def _long_line(c: Conn) -> None:
    events = stream_events()
    events[2] = event(chunk("x" * 300_000))
    c.sse(b"".join(events))


def _error_event(c: Conn) -> None:
    err = json.dumps({"error": {"object": "error", "message": "boom: the engine died", "type": "InternalServerError",
                                "code": 500}}).encode()
    c.sse(b"".join(stream_events()[:3]) + event(err) + event(b"[DONE]"))


def _broken(data: bytes) -> Handler:
    return lambda c: c.sse(b"".join(stream_events()[:3]) + event(data) + b"".join(stream_events()[3:]))


def _cut_clean(c: Conn) -> None:
    c.sse(b"".join(stream_events()[:4]))  # role + 3 tokens, then FIN


def _cut_length(c: Conn) -> None:
    c.head(extra=b"Content-Length: 100000\r\n")
    c.send(b"".join(stream_events()[:4]))


def _reset_mid(c: Conn) -> None:
    c.sse(b"".join(stream_events()[:4]))
    time.sleep(0.05)
    c.reset()


def _final_event_no_blank(c: Conn) -> None:
    events = stream_events()[:-2]  # no finish chunk, no [DONE]
    c.sse(b"".join(events)[:-2])  # the last content event lacks its line end and blank line


def _close_before_headers(c: Conn) -> None:
    c.sock.close()


def _reset_before_headers(c: Conn) -> None:
    c.reset()


def _garbage_status(c: Conn) -> None:
    c.send(b"HELLO THERE\r\n\r\n")


def _silent(c: Conn) -> None:
    c.hang()


def _stall_after_headers(c: Conn) -> None:
    c.head()
    c.hang()


def _stall_mid(c: Conn) -> None:
    c.sse(b"".join(stream_events()[:3]))
    c.hang()


def _status(code: int, body: bytes, ctype: bytes = b"application/json", extra: bytes = b"") -> Handler:
    return lambda c: c.status(code, body, ctype, extra)


def _vllm_error(message: str, code: int) -> bytes:
    return json.dumps({"error": {"object": "error", "message": message, "type": "BadRequestError", "param": None,
                                 "code": code}}).encode()


def _echo_key(c: Conn) -> None:
    auth = c.headers.get("authorization", "(none)")
    c.status(401, _vllm_error(f"Incorrect API key provided: {auth}. Your key: {auth.removeprefix('Bearer ')}", 401))


def _redirect(c: Conn) -> None:
    c.status(307, b"", b"text/plain", b"Location: /elsewhere/v1/chat/completions\r\n")


def _html_200(c: Conn) -> None:
    body = b"<html><body>Welcome to nginx!</body></html>"
    c.head(extra=b"Content-Length: %d\r\n" % len(body), ctype=b"text/html; charset=utf-8")
    c.send(body)


def _json_200(c: Conn) -> None:
    body = json.dumps({"id": "chatcmpl-x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}).encode()
    c.head(extra=b"Content-Length: %d\r\n" % len(body), ctype=b"application/json")
    c.send(body)


def _empty_200(c: Conn) -> None:
    c.head(extra=b"Content-Length: 0\r\n", ctype=None)


def _empty_sse(c: Conn) -> None:
    c.head(extra=b"Content-Length: 0\r\n")


def _gzip(c: Conn) -> None:
    body = gzip.compress(b"".join(stream_events()))
    c.head(extra=b"Content-Encoding: gzip\r\nContent-Length: %d\r\n" % len(body))
    c.send(body)


def _runaway(c: Conn, empty: bool = False) -> None:
    c.head()
    c.send(event(chunk(role=True)))
    try:
        for i in range(RUNAWAY_LIMIT):
            c.send(event(chunk("" if empty else f" r{i}")))
            if i % 10 == 0:
                time.sleep(0.001)  # a runaway, not a busy loop: the server must keep accepting
    except OSError:
        pass  # the client stopped reading and closed


_FLOOD_BODIES: dict[tuple[int, bool], bytes] = {}


def _flood_body(tokens: int, comments: bool) -> bytes:
    """Built once per shape (200k tokens take the server ~0.5 s of CPU: not while a client is being measured)."""
    key = (tokens, comments)
    with _lock:
        body = _FLOOD_BODIES.get(key)
        if body is None:
            keep_alive = b": keep-alive\n" * 8 if comments else b""
            body = _FLOOD_BODIES[key] = b"".join([
                event(chunk(role=True)), *(event(chunk(f" f{i}")) + keep_alive for i in range(tokens)),
                event(chunk(finish="length")), event(b"[DONE]")])
    return body


def _flood(c: Conn, comments: bool = False, tokens: int = FLOOD_TOKENS) -> None:
    """A well-formed stream of `tokens` tokens written as fast as the socket takes them (64 KiB writes, no
    pause): the client's socket buffer is never empty, so a read loop that waits for no byte never yields.
    With `comments`, keep-alive comment lines between the tokens (SSE without events, many of them)."""
    body = _flood_body(tokens, comments)
    c.head()
    try:
        for i in range(0, len(body), 65536):
            c.send(body[i:i + 65536])
    except OSError:
        pass  # the client stopped reading and closed


BEHAVIOURS: dict[str, Handler] = {
    # valid SSE in every shape a server may use: read to the end, every token counted
    "ok": _ok,
    "crlf": _reframed(lambda b: b.replace(b"\n", b"\r\n")),
    "cr": _reframed(lambda b: b.replace(b"\n", b"\r")),
    "no-space": _reframed(lambda b: b.replace(b"data: ", b"data:")),
    "comments": _comments,
    "multiline-data": _multiline,
    "bom": _bom,
    "split-writes": _split_writes,
    "utf8-split": _utf8_split,
    "fields": _fields,
    "done-no-blank": _done_no_blank,
    "done-one-newline": _done_one_newline,
    "usage": _usage,
    "no-delta": _no_delta,
    "invalid-utf8": _invalid_utf8,
    "chunked": _chunked,
    "http10": _http10,
    "keepalive-after-done": _keepalive_after_done,
    "done-then-garbage": _done_then_garbage,
    "long-line": _long_line,
    # broken content
    "error-event": _error_event,
    "not-json": _broken(b"{this is not json"),
    "no-choices": _broken(b'{"object":"chat.completion.chunk"}'),
    "json-array": _broken(b"[1, 2, 3]"),
    "json-null": _broken(b"null"),
    # cuts and resets
    "cut-clean": _cut_clean,
    "cut-chunked": lambda c: _chunked(c, cut=True),
    "cut-content-length": _cut_length,
    "reset-mid": _reset_mid,
    "final-event-no-blank": _final_event_no_blank,
    "close-before-headers": _close_before_headers,
    "reset-before-headers": _reset_before_headers,
    "garbage-status": _garbage_status,
    # silences
    "silent": _silent,
    "stall-after-headers": _stall_after_headers,
    "stall-mid": _stall_mid,
    # status codes
    "status-400": _status(400, _vllm_error("max_tokens is too large", 400)),
    "status-401-echo-key": _echo_key,
    "status-429": _status(429, _vllm_error("rate limited", 429), extra=b"Retry-After: 1\r\n"),
    "status-500-html": _status(500, b"<html><body><h1>500 Internal Server Error</h1></body></html>", b"text/html"),
    "status-503-empty": _status(503, b"", b"text/plain"),
    "status-204": _status(204, b"", b"text/event-stream"),
    "redirect-307": _redirect,
    # content types and encodings
    "html-200": _html_200,
    "json-200": _json_200,
    "empty-200": _empty_200,
    "empty-sse": _empty_sse,
    "gzip": _gzip,
    # runaway and flooding
    "runaway": _runaway,
    "flood-empty": lambda c: _runaway(c, empty=True),
}

# Well-formed but as fast as the socket goes (benchmarks/bench_flood.py, tests/users/test_flood.py): read with a
# max_tokens of at least FLOOD_TOKENS they are valid streams, so they stay out of BEHAVIOURS and its /mix.
FLOODS: dict[str, Handler] = {
    "flood": _flood,
    "flood-comments": lambda c: _flood(c, comments=True),
    "flood-big": lambda c: _flood(c, tokens=FLOOD_BIG_TOKENS),
}

_received: list[tuple[str, str]] = []
_lock = threading.Lock()
_mix = iter(())


def _mixed() -> str:
    global _mix
    with _lock:
        name = next(_mix, None)
        if name is None:
            _mix = iter(list(BEHAVIOURS))
            name = next(_mix)
        return name


def _read_request(sock: socket.socket) -> tuple[str, str, dict[str, str]] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            return None
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return method, path, headers


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(HANG_S)
        try:
            request = _read_request(sock)
            if request is None:
                return
            method, path, headers = request
            conn = Conn(sock, path, headers)
            if method == "GET" and path == "/_received":
                with _lock:
                    body = json.dumps(_received).encode()
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                          b"Connection: close\r\n\r\n%s" % (len(body), body))
                return
            if method != "POST":  # the start-up check's model list; anything else (/metrics, a ledger) is not here
                if path.endswith("/v1/models"):
                    body = b'{"object": "list", "data": [{"id": "llm", "object": "model"}]}'
                    conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                              b"Connection: close\r\n\r\n%s" % (len(body), body))
                else:
                    conn.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            parts = path.split("/")
            if len(parts) > 2 and parts[1] == "b":
                name = parts[2]
            elif len(parts) > 1 and parts[1] == "mix":
                name = _mixed()
            else:
                name = "?"
            with _lock:
                _received.append((name, headers.get("x-request-id", "")))
            handler = BEHAVIOURS.get(name) or FLOODS.get(name)
            if handler is None:
                conn.status(400, _vllm_error(f"no behaviour {name!r}", 400))
                return
            handler(conn)
        except OSError:
            pass  # the client went away: that is what many behaviours are about
        finally:
            with contextlib.suppress(OSError):
                sock.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def main() -> None:
    server = _Server(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0), _Handler)
    print(f"hostile server listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
