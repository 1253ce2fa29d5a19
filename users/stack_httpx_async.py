"""The `httpx-async` stack (`httpx.AsyncClient`, `send(stream=True)`, `aiter_lines`), run on the bridge's loop.

The twin of users/stack_httpx.py: the same request, timeouts and error words, with the async line iterator
kept on the stream object for the same reason (closing it closes the connection).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from stopstorm.metrics.record import StreamRecord
from stopstorm.users.core import ERROR_BODY_LIMIT, AsyncStreamingUser, StreamFailure, http_failure
from stopstorm.users.httpcore_stamps import StampedAsyncStream, install_async_on_client, stamped_stream
from stopstorm.users.request import StreamRequest
from stopstorm.users.socket_stamps import arrival_clock, stamp_headers
from stopstorm.users.stack_httpx import describe_httpx_error, httpx_timeout
from stopstorm.users.tls import shared_ssl_context
from stopstorm.users.verdicts import response_failure

__all__ = ["HttpxAsyncTransport", "HttpxAsyncUser"]


class _HttpxAsyncStream:
    __slots__ = ("_lines", "_resp", "_timeout", "arrival")

    def __init__(self, resp: httpx.Response, timeout: float, stamps: StampedAsyncStream | None) -> None:
        self._resp = resp
        self._lines = resp.aiter_lines()
        self._timeout = timeout
        self.arrival = arrival_clock(stamps)  # the network read's clock

    async def aitems(self) -> AsyncIterator[str]:
        try:
            async for line in self._lines:
                yield line
        except httpx.HTTPError as exc:
            raise StreamFailure(describe_httpx_error(exc, self._timeout, mid_stream=True)) from None

    async def aclose(self) -> None:
        await self._resp.aclose()


class HttpxAsyncTransport:
    """One `httpx.AsyncClient` per user; create it inside the bridge's loop (AsyncStreamingUser does).

    Its own pool and connections, over the process's one SSL context (users/tls.py): built with a context of
    its own the client costs ~21 ms of the loop's CPU, and 200 users starting at once stalled it for seconds.
    Its connections stamp their writes and reads (users/httpcore_stamps.py).
    """

    name = "httpx-async"
    yields_chunks = False

    def __init__(self, insecure: bool = False) -> None:
        self.client = httpx.AsyncClient(verify=shared_ssl_context("httpx", insecure))
        install_async_on_client(self.client)

    async def open(self, host: str, request: StreamRequest, record: StreamRecord,
                   timeout: float, connect_timeout: float = 10.0) -> _HttpxAsyncStream:
        req = self.client.build_request("POST", host + request.path, content=request.body_bytes,
                                        headers=request.headers, timeout=httpx_timeout(timeout, connect_timeout))
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise StreamFailure(describe_httpx_error(exc, timeout, mid_stream=False)) from None
        stamps = stamped_stream(resp)
        stamp_headers(record, stamps)
        record.status = resp.status_code
        if resp.status_code >= 400:
            body = bytearray()
            try:
                async for part in resp.aiter_bytes():
                    body += part
                    if len(body) >= ERROR_BODY_LIMIT:
                        break
            except httpx.HTTPError:  # the error body is a courtesy; the status alone is the failure
                pass
            finally:
                await resp.aclose()
            raise http_failure(resp.status_code, bytes(body))
        h = resp.headers
        failure = response_failure(resp.status_code, h.get("content-type"), h.get("content-encoding"),
                                   h.get("location"))
        if failure is not None:
            await resp.aclose()
            raise StreamFailure(failure)
        return _HttpxAsyncStream(resp, timeout, stamps)

    async def shutdown(self) -> None:
        await self.client.aclose()


class HttpxAsyncUser(AsyncStreamingUser):
    stack = "httpx-async"
    transport_class = HttpxAsyncTransport
