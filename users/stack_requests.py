"""The `requests` stack (stream=True, iter_lines): only what is particular to requests lives here.

Redirects are not followed (`allow_redirects=False`), as by every stack (users/verdicts.py). Over a body that
is neither chunked nor sized (HTTP/1.0 style, closed to end it), `iter_lines` reads 512 bytes at a time and
urllib3 waits for all 512: lines arrive late, and those still held when a timeout fires are not counted.

Over plain HTTP on Linux, urllib3's socket is a users/socket_stamps.py `StampingSocket` (a connection class of
ours in the session's adapter): each chunk is stamped with the kernel's receive time of its bytes, and the
request just before its last write, however long the greenlet then waited for the hub.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import ReadTimeoutError

from stopstorm.metrics.record import StreamRecord
from stopstorm.users.core import ERROR_BODY_LIMIT, StreamFailure, SyncStreamingUser, connect_timed_out, http_failure
from stopstorm.users.request import StreamRequest
from stopstorm.users.socket_stamps import StampingSocket, arrival_clock, enable_receive_stamps, stamp_headers
from stopstorm.users.verdicts import response_failure

__all__ = ["RequestsTransport", "RequestsUser"]

def _describe(exc: requests.RequestException, timeout: float) -> str:
    if isinstance(exc, requests.ConnectTimeout):  # a Timeout too, but no connection, not a silent server
        return connect_timed_out(type(exc).__name__)
    # Mid-stream, iter_lines raises a read timeout as ConnectionError(urllib3's ReadTimeoutError).
    if isinstance(exc, requests.Timeout) or (exc.args and isinstance(exc.args[0], ReadTimeoutError)):
        return f"timeout: no byte for {timeout:g} s ({type(exc).__name__})"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"stream cut off: connection broken mid-stream ({exc})"
    if isinstance(exc, requests.ConnectionError):
        return f"connection error: {exc}"
    return f"{type(exc).__name__}: {exc}"


class _StampedConnection(HTTPConnection):
    """urllib3's plain-HTTP connection, its socket read through `recvmsg` for the kernel's receive stamps."""

    def _new_conn(self) -> Any:
        sock = super()._new_conn()
        return StampingSocket(sock) if enable_receive_stamps(sock) else sock


class _StampedPool(HTTPConnectionPool):
    ConnectionCls = _StampedConnection


class _StampingAdapter(HTTPAdapter):
    """requests' own adapter, with our connection class for http:// (https:// is urllib3's, unstamped)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {**self.poolmanager.pool_classes_by_scheme, "http": _StampedPool}


def _stamping_socket(resp: requests.Response) -> StampingSocket | None:
    conn = getattr(resp.raw, "connection", None)
    sock = getattr(conn, "sock", None)
    return sock if isinstance(sock, StampingSocket) else None


class _RequestsStream:
    __slots__ = ("_lines", "_resp", "_timeout", "arrival")

    def __init__(self, resp: requests.Response, timeout: float, sock: StampingSocket | None) -> None:
        self._resp = resp
        # Kept here, not only in the reading loop: closing iter_lines' generator closes the connection, so a
        # `hold` must keep it and a `drop` lets it go with the response.
        self._lines = resp.iter_lines()
        self._timeout = timeout
        self.arrival = arrival_clock(sock)

    def items(self) -> Iterator[bytes]:
        try:
            for line in self._lines:  # noqa: UP028  (`yield from` would close the lines when this closes)
                yield line
        except requests.RequestException as exc:
            raise StreamFailure(_describe(exc, self._timeout)) from None

    def close(self) -> None:
        self._resp.close()


class RequestsTransport:
    """One `requests.Session` per user, as a front-end backend would keep one."""

    name = "requests"
    yields_chunks = False

    def __init__(self, insecure: bool = False) -> None:
        self.session = requests.Session()
        # Passed again with each request: requests lets $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE replace a
        # request's `verify` left unset before the session's is merged, so `session.verify = False` alone still
        # verified wherever those are set (psf/requests#3829; Debian and most CI images set them).
        self.session.verify = not insecure
        self.session.mount("http://", _StampingAdapter())

    def open(self, host: str, request: StreamRequest, record: StreamRecord, timeout: float,
             connect_timeout: float = 10.0) -> _RequestsStream:
        try:
            resp = self.session.post(host + request.path, data=request.body_bytes, headers=request.headers,
                                     stream=True, timeout=(connect_timeout, timeout), allow_redirects=False,
                                     verify=self.session.verify)
        except requests.RequestException as exc:
            raise StreamFailure(_describe(exc, timeout)) from None
        sock = _stamping_socket(resp)
        stamp_headers(record, sock)
        record.status = resp.status_code
        if resp.status_code >= 400:
            try:
                body = resp.raw.read(ERROR_BODY_LIMIT, decode_content=True)
            except Exception:  # the error body is a courtesy; the status alone is the failure
                body = b""
            finally:
                resp.close()
            raise http_failure(resp.status_code, body)
        h = resp.headers
        failure = response_failure(resp.status_code, h.get("content-type"), h.get("content-encoding"),
                                   h.get("location"))
        if failure is not None:
            resp.close()
            raise StreamFailure(failure)
        return _RequestsStream(resp, timeout, sock)

    def shutdown(self) -> None:
        self.session.close()


class RequestsUser(SyncStreamingUser):
    stack = "requests"
    transport_class = RequestsTransport
