"""The `fasthttp` stack: Locust's FastHttpUser transport (geventhttpclient), read line by line.

Why not subclass `FastHttpUser` or call its `FastHttpSession`: the session fires Locust's `request` event when
the headers arrive (a stream must be reported once, after its last chunk, by the core), wraps failures in fake
responses, follows redirects, asks for gzip, and its `iter_lines` batches 1 KiB reads, which ruins inter-token
timing (DESIGN.md §5). Underneath, FastHttpSession → LocustUserAgent → HTTPClientPool → `HTTPClient.request`
returns a geventhttpclient `HTTPSocketPoolResponse`; this module calls that bottom layer itself, so the socket,
its pool and the response object (whose release and garbage collection decide what the server sees at Stop)
are exactly FastHttpUser's, and reads lines with the response's own `readline`, which returns each SSE line
as soon as its bytes are in.

Lines are read up to LF (the SSE decoder strips a CR before it); lines a server ends with a bare CR are split
here, but reach the reader only with the next LF or the body's end (their timing is late, their count right).
Releasing a response that is not complete closes its socket (geventhttpclient's `should_close`), so `close`
really closes; an unread response dropped by everyone is closed by its `__del__`.

Over plain HTTP on Linux, the pool's sockets are users/socket_stamps.py `StampingSocket`s (the pool's connect
step wrapped): each chunk is stamped with the kernel's receive time of its bytes, and the request with the moment
its write began, however long the greenlet then waited for the hub.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import gevent.ssl
from geventhttpclient import HTTPClient
from geventhttpclient.connectionpool import ConnectionPool
from geventhttpclient.response import HTTPParseError, HTTPSocketPoolResponse

from stopstorm.metrics.record import StreamRecord
from stopstorm.users.core import ERROR_BODY_LIMIT, StreamFailure, SyncStreamingUser, http_failure
from stopstorm.users.request import StreamRequest
from stopstorm.users.socket_stamps import StampingSocket, arrival_clock, enable_receive_stamps, stamp_headers
from stopstorm.users.verdicts import response_failure

__all__ = ["FastHttpStreamUser", "FastHttpTransport"]

def _unverified_context(**_: Any) -> ssl.SSLContext:
    """--insecure's context. geventhttpclient's own `insecure=True` only turns hostname checking off and leaves
    `verify_mode` at CERT_REQUIRED, so a self-signed certificate was still refused (Locust's FastHttpUser passes
    such a factory for the same reason); `cafile` is ignored: nothing is verified against it."""
    context = gevent.ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = gevent.ssl.CERT_NONE
    return context


def _describe(exc: Exception, timeout: float, mid_stream: bool) -> str:
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return f"timeout: no byte for {timeout:g} s ({type(exc).__name__})"
    if mid_stream:
        return f"stream cut off: connection broken mid-stream ({detail})"
    return f"connection error: {detail}"


def _header(resp: HTTPSocketPoolResponse, name: str) -> str | None:
    value = resp.get(name)
    return ", ".join(value) if isinstance(value, list) else value


def _cr_lines(line: bytes) -> list[bytes]:
    """A "line" read up to LF that holds bare CRs (a server ending lines with CR): its lines."""
    return line.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")


def _stamp_pool(client: HTTPClient) -> None:
    """Wrap each socket the client's plain-HTTP pool connects in a StampingSocket (a TLS pool is left alone: its
    sockets are SSL sockets, which have no `recvmsg`). The pool keeps, reuses and closes the wrapper as the
    socket it returned; every call but the reads and the write goes straight to the socket."""
    pool = client._connection_pool
    if type(pool) is not ConnectionPool:
        return
    connect = pool._connect_socket

    def connect_stamped(sock: Any, address: Any) -> Any:
        sock = connect(sock, address)
        return StampingSocket(sock) if enable_receive_stamps(sock) else sock

    pool._connect_socket = connect_stamped  # type: ignore[method-assign]


class _FastHttpStream:
    __slots__ = ("_resp", "_timeout", "arrival")

    def __init__(self, resp: HTTPSocketPoolResponse, timeout: float, sock: StampingSocket | None) -> None:
        self._resp = resp
        self._timeout = timeout
        self.arrival = arrival_clock(sock)

    def items(self) -> Iterator[bytes]:
        readline = self._resp.readline
        try:
            while line := readline(b"\n"):
                if line.find(b"\r", 0, len(line) - 2) < 0:
                    yield line
                else:  # bare CRs end lines too (SSE): split them here (they arrive with the next LF or the end)
                    yield from _cr_lines(line)
            if rest := self._resp.read():  # a last line without its terminator
                yield from _cr_lines(rest)
        except (OSError, HTTPParseError) as exc:
            raise StreamFailure(_describe(exc, self._timeout, mid_stream=True)) from None

    def close(self) -> None:
        self._resp.release()


class FastHttpTransport:
    """One geventhttpclient `HTTPClient` per user (a pool of up to 10 connections, FastHttpUser's default).

    TLS certificates are verified, like every other stack (FastHttpUser itself defaults to insecure).
    """

    name = "fasthttp"
    yields_chunks = False

    def __init__(self, insecure: bool = False) -> None:
        self.clients: dict[str, HTTPClient] = {}  # by host (one, under Locust)
        self.insecure = insecure  # --insecure: skip TLS verification

    def _client(self, host: str, timeout: float, connect_timeout: float) -> HTTPClient:
        client = self.clients.get(host)
        if client is None:
            client = self.clients[host] = HTTPClient.from_url(
                host, connection_timeout=connect_timeout, network_timeout=timeout, concurrency=10,
                insecure=self.insecure, ssl_context_factory=_unverified_context if self.insecure else None)
            _stamp_pool(client)
        return client

    def open(self, host: str, request: StreamRequest, record: StreamRecord, timeout: float,
             connect_timeout: float = 10.0) -> _FastHttpStream:
        path = urlsplit(host).path.rstrip("/") + request.path
        try:
            resp = self._client(host, timeout, connect_timeout).request("POST", path, body=request.body_bytes,
                                                       headers=request.headers)
        except (OSError, HTTPParseError) as exc:
            raise StreamFailure(_describe(exc, timeout, mid_stream=False)) from None
        sock = getattr(resp, "_sock", None)
        if not isinstance(sock, StampingSocket):
            sock = None
        stamp_headers(record, sock)
        record.status = resp.status_code
        if resp.status_code >= 400:
            try:
                body = resp.read(ERROR_BODY_LIMIT)
            except (OSError, HTTPParseError):  # the error body is a courtesy; the status alone is the failure
                body = b""
            finally:
                resp.release()
            raise http_failure(resp.status_code, body)
        failure = response_failure(resp.status_code, _header(resp, "content-type"), _header(resp, "content-encoding"),
                                   _header(resp, "location"))
        if failure is not None:
            resp.release()
            raise StreamFailure(failure)
        return _FastHttpStream(resp, timeout, sock)

    def shutdown(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()


class FastHttpStreamUser(SyncStreamingUser):
    """Named apart from Locust's own `FastHttpUser`, which it does not subclass (see above)."""

    stack = "fasthttp"
    transport_class = FastHttpTransport
