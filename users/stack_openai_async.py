"""The `openai-async` stack: `openai.AsyncOpenAI` on the bridge's loop, iterated chunk by chunk.

The twin of users/stack_openai.py (same call, same words for failures, same decoder, same verdicts). The SDK's
`AsyncStream` is an async generator in a reference cycle: dropped unclosed, the garbage collector finds it
and asyncio's async-generator finaliser schedules its close on the loop.

The SDK's first request on each client asks `platform.platform()` for a header, and its first call runs
`uname -p` as a subprocess. On the bridge's loop thread gevent's subprocess forks and then fails (its child
watchers work only on the main thread's loop), so nothing was cached and every new client forked again, on the
loop: 16 ms a fork in a large process, so 64 users starting at once stalled the loop for a second (issue 21).
This module asks once at import, in the main thread, where the answer is cached for every later call.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import AsyncIterator
from typing import Any

import openai

from stopstorm.metrics.record import StreamRecord
from stopstorm.users.core import AsyncStreamingUser, StreamFailure
from stopstorm.users.httpcore_stamps import StampedAsyncStream, install_async_on_client, stamped_stream
from stopstorm.users.request import StreamRequest
from stopstorm.users.socket_stamps import arrival_clock, stamp_headers
from stopstorm.users.stack_openai import (
    HTTP_LIBRARY,
    EventDecoder,
    EventDecoderMixin,
    api_key_of,
    call_args,
    describe_openai_error,
    status_failure,
    stream_failure,
)
from stopstorm.users.tls import shared_ssl_context

__all__ = ["OpenAIAsyncTransport", "OpenAIAsyncUser"]

platform.platform()  # cached from here on: see the module's docstring


class _OpenAIAsyncStream:
    __slots__ = ("_chunks", "_decoder", "_stream", "_timeout", "arrival")

    def __init__(self, stream: openai.AsyncStream[Any], decoder: EventDecoder, timeout: float,
                 stamps: StampedAsyncStream | None) -> None:
        self._stream = stream
        self._chunks = aiter(stream)
        self._decoder = decoder
        self._timeout = timeout
        self.arrival = arrival_clock(stamps)  # the network read's clock, before the SDK builds its model

    async def aitems(self) -> AsyncIterator[tuple[Any, str]]:
        decoder = self._decoder
        try:
            async for chunk in self._chunks:
                yield chunk, decoder.last_data
        except openai.APIConnectionError as exc:  # timeouts too
            raise StreamFailure(describe_openai_error(exc, self._timeout, mid_stream=True)) from None
        except (openai.APIError, json.JSONDecodeError):  # an event the SDK refused: judged as every stack judges it
            yield None, decoder.last_data
            return
        except openai.OpenAIError as exc:
            raise StreamFailure(describe_openai_error(exc, self._timeout, mid_stream=True)) from None
        for item in decoder.end():
            yield item

    async def aclose(self) -> None:
        await self._stream.close()


class _AsyncClient(EventDecoderMixin, openai.AsyncOpenAI):
    pass


class OpenAIAsyncTransport:
    """One async SDK client per user, built inside the bridge's loop at the first stream.

    Per user, not one per process: a `drop` must leave that stream's connection to the garbage collector
    exactly as the SDK does, and the [DONE]-noting decoder is the client's last one (one stream at a time per
    client). Only the SSL context is the process's one (users/tls.py): built with its own, each client cost
    ~21 ms on the bridge loop, inside the first stream's TTFT, and 64 users starting at once stalled the loop
    for seconds (issue 21).
    """

    name = "openai-async"
    yields_chunks = True

    def __init__(self, insecure: bool = False) -> None:
        self.clients: dict[str, _AsyncClient] = {}  # by host (one, under Locust)
        self.insecure = insecure

    def warm(self, host: str, api_key: str | None) -> None:
        """Build the client, and the SDK's lazily imported resources, before the first stream's send stamp:
        at the first `create()` they cost ~25 ms (once a process) plus the client's own build, inside that
        stream's TTFT (and, on the bridge, in front of every other user's request)."""
        client = self._client(host, api_key or "EMPTY")
        _ = client.chat.completions, client.completions

    def _client(self, host: str, api_key: str) -> _AsyncClient:
        client = self.clients.get(host)
        if client is None:
            http_client = openai.DefaultAsyncHttpxClient(verify=shared_ssl_context(HTTP_LIBRARY, self.insecure),
                                                         follow_redirects=False)
            install_async_on_client(http_client)  # write and read stamps at the network stream
            client = self.clients[host] = _AsyncClient(base_url=host + "/v1", api_key=api_key, max_retries=0,
                                                       http_client=http_client)
        return client

    async def open(self, host: str, request: StreamRequest, record: StreamRecord,
                   timeout: float, connect_timeout: float = 10.0) -> _OpenAIAsyncStream:
        client = self._client(host, api_key_of(request))
        create = client.chat.completions.create if request.endpoint == "chat" else client.completions.create
        try:
            stream = await create(**call_args(request, timeout, connect_timeout))
        except openai.APIStatusError as exc:
            record.headers = time.monotonic()
            record.status = exc.status_code
            raise status_failure(exc) from None
        except openai.OpenAIError as exc:
            raise StreamFailure(describe_openai_error(exc, timeout, mid_stream=False)) from None
        stamps = stamped_stream(stream.response)
        stamp_headers(record, stamps)
        record.status = stream.response.status_code
        failure = stream_failure(stream.response)
        if failure is not None:
            await stream.close()
            raise StreamFailure(failure)
        assert client.last_decoder is not None  # the SDK asked for one when it built the stream
        return _OpenAIAsyncStream(stream, client.last_decoder, timeout, stamps)

    async def shutdown(self) -> None:
        for client in self.clients.values():
            await client.close()
        self.clients.clear()


class OpenAIAsyncUser(AsyncStreamingUser):
    stack = "openai-async"
    transport_class = OpenAIAsyncTransport
