"""The `httpx` stack (sync `httpx.Client`, `send(stream=True)`, `iter_lines`): only what is particular to httpx.

The response's line iterator is kept on the stream object, not only inside the loop that reads it: httpx closes
the connection when that iterator is closed (httpcore's pool stream closes on any exception thrown into it,
`GeneratorExit` included), so a `hold` must keep it, and a `drop` lets it go with the response.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx

from stopstorm.metrics.record import StreamRecord
from stopstorm.users.core import ERROR_BODY_LIMIT, StreamFailure, SyncStreamingUser, connect_timed_out, http_failure
from stopstorm.users.httpcore_stamps import install_on_client, stamping_socket
from stopstorm.users.request import StreamRequest
from stopstorm.users.socket_stamps import StampingSocket, arrival_clock, stamp_headers
from stopstorm.users.tls import shared_ssl_context
from stopstorm.users.verdicts import response_failure

__all__ = ["HttpxTransport", "HttpxUser", "describe_httpx_error", "httpx_timeout"]


# httpx logs every request at INFO, and Locust's logging shows INFO: a line per stream would flood the run's
# output and cost CPU on the load generator. Warnings and errors still show.
logging.getLogger("httpx").setLevel(logging.WARNING)


def httpx_timeout(timeout: float, connect_timeout: float = 10.0) -> httpx.Timeout:
    """`timeout` between bytes; connecting gets `connect_timeout`."""
    return httpx.Timeout(timeout, connect=connect_timeout)


def describe_httpx_error(exc: httpx.HTTPError, timeout: float, mid_stream: bool) -> str:
    """One httpx exception in words (shared with the async twin)."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):  # a timeout too, but no connection, not a silent server
        return connect_timed_out(type(exc).__name__)
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout: no byte for {timeout:g} s ({type(exc).__name__})"
    if mid_stream and isinstance(exc, httpx.TransportError):
        return f"stream cut off: connection broken mid-stream ({detail})"
    if isinstance(exc, httpx.TransportError):
        return f"connection error: {detail}"
    return f"{type(exc).__name__}: {detail}"


class _HttpxStream:
    __slots__ = ("_lines", "_resp", "_timeout", "arrival")

    def __init__(self, resp: httpx.Response, timeout: float, sock: StampingSocket | None) -> None:
        self._resp = resp
        self._lines = resp.iter_lines()
        self._timeout = timeout
        self.arrival = arrival_clock(sock)

    def items(self) -> Iterator[str]:
        try:
            for line in self._lines:  # noqa: UP028  (`yield from` would close the lines when this closes)
                yield line
        except httpx.HTTPError as exc:
            raise StreamFailure(describe_httpx_error(exc, self._timeout, mid_stream=True)) from None

    def close(self) -> None:
        self._resp.close()


class HttpxTransport:
    """One `httpx.Client` per user (its own connection pool), as a backend would keep one, over the process's
    one SSL context (users/tls.py: a context of its own costs ~21 ms of CPU, which blocks the hub). Over plain
    HTTP its connections read through a StampingSocket (users/httpcore_stamps.py)."""

    name = "httpx"
    yields_chunks = False

    def __init__(self, insecure: bool = False) -> None:
        self.client = httpx.Client(verify=shared_ssl_context("httpx", insecure))
        install_on_client(self.client)

    def open(self, host: str, request: StreamRequest, record: StreamRecord, timeout: float,
             connect_timeout: float = 10.0) -> _HttpxStream:
        req = self.client.build_request("POST", host + request.path, content=request.body_bytes,
                                        headers=request.headers, timeout=httpx_timeout(timeout, connect_timeout))
        try:
            resp = self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise StreamFailure(describe_httpx_error(exc, timeout, mid_stream=False)) from None
        sock = stamping_socket(resp)
        stamp_headers(record, sock)
        record.status = resp.status_code
        if resp.status_code >= 400:
            body = bytearray()
            try:
                for part in resp.iter_bytes():
                    body += part
                    if len(body) >= ERROR_BODY_LIMIT:
                        break
            except httpx.HTTPError:  # the error body is a courtesy; the status alone is the failure
                pass
            finally:
                resp.close()
            raise http_failure(resp.status_code, bytes(body))
        h = resp.headers
        failure = response_failure(resp.status_code, h.get("content-type"), h.get("content-encoding"),
                                   h.get("location"))
        if failure is not None:
            resp.close()
            raise StreamFailure(failure)
        return _HttpxStream(resp, timeout, sock)

    def shutdown(self) -> None:
        self.client.close()


class HttpxUser(SyncStreamingUser):
    stack = "httpx"
    transport_class = HttpxTransport
