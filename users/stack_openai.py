"""The `openai` stack: the official SDK (`openai.OpenAI`, which talks through `httpx2`), iterated chunk by chunk.

Only what is particular to the SDK lives here: the call (typed parameters, vLLM's extras in `extra_body`, our
request id and key in `extra_headers`), its exceptions in words, and what the SDK hides. Its event parsing is
replaced through the client's `_make_sse_decoder` hook by `EventDecoder`, stopstorm's own SSE decoder
(users/sse.py) behind the SDK's `SSEBytesDecoder` protocol, so the SDK reads the stream by the same rules as
every other stack: invalid UTF-8 replaced (the SDK's own decoder raises UnicodeDecodeError), bare-CR line ends,
a BOM, the last event flushed at the body's end (the SDK's own drops it), and [DONE] noted (the SDK swallows
it and ends the iteration there *and* when the body just ends). Each chunk goes to the core with the event
data it was built from, which is what is judged; an event the SDK refuses itself (its APIError for an error
event, json's JSONDecodeError) is handed over the same way, so its verdict and words are every stack's.

Redirects are not followed (the SDK's client follows them by default; `follow_redirects=False` on the client
stopstorm builds), and the response's status and headers are judged as every stack's (users/verdicts.py).

The SDK's `Stream` lives in a reference cycle with its own generator, so dropping it leaves the connection
open until the garbage collector runs (DESIGN.md §5); the stream object here keeps the SDK's iterator for the
same reason as the other stacks (`hold` keeps everything, `drop` lets everything go at once).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
from openai._streaming import ServerSentEvent  # the SDK's event type, which its stream reads from our decoder

from stopstorm.metrics.record import StreamRecord
from stopstorm.users.core import HubTurn, StreamFailure, SyncStreamingUser, connect_timed_out, error_text
from stopstorm.users.httpcore_stamps import install_on_client, stamping_socket
from stopstorm.users.request import StreamRequest
from stopstorm.users.socket_stamps import StampingSocket, arrival_clock, stamp_headers
from stopstorm.users.sse import DONE, SSEDecoder, SSEEvent
from stopstorm.users.tls import shared_ssl_context
from stopstorm.users.verdicts import response_failure

__all__ = ["HTTP_LIBRARY", "EventDecoder", "EventDecoderMixin", "OpenAITransport", "OpenAIUser", "api_key_of",
           "call_args", "describe_openai_error", "status_failure", "stream_failure"]

# The SDK's httpx2 logs every request at INFO (see users/stack_httpx.py): keep warnings and errors only.
logging.getLogger("httpx2").setLevel(logging.WARNING)

# The httpx-family module the SDK's own client class is built on (httpx2 for openai 3.x, httpx before): its
# default SSL context is the one to share (users/tls.py).
HTTP_LIBRARY = openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0]

# Body fields the SDK's create() takes as typed parameters; everything else goes in extra_body.
_TYPED = ("model", "messages", "prompt", "max_tokens", "temperature", "stream_options")


class EventDecoder:
    """stopstorm's SSE decoder behind the SDK's `SSEBytesDecoder` protocol (`iter_bytes` / `aiter_bytes`): one
    per stream (the SDK asks for one per stream). `last_data` is the data of the event the SDK read last;
    `done` says whether `data: [DONE]` went by."""

    __slots__ = ("done", "last_data")

    def __init__(self) -> None:
        self.done = False
        self.last_data = ""

    def _sse(self, event: SSEEvent) -> ServerSentEvent:
        self.last_data = event.data
        if event.data == DONE:
            self.done = True
        return ServerSentEvent(event=event.event, data=event.data, id=event.id, retry=event.retry)

    def iter_bytes(self, iterator: Iterator[bytes]) -> Iterator[ServerSentEvent]:
        decoder = SSEDecoder()
        turn = HubTurn()  # the SDK reads on inside its own iterator through bytes that make no event (comments)
        for chunk in iterator:
            for event in decoder.decode(chunk):
                yield self._sse(event)
            turn.take()
        for event in decoder.flush():  # the body's end: its last event, even without its blank line
            yield self._sse(event)

    async def aiter_bytes(self, iterator: AsyncIterator[bytes]) -> AsyncIterator[ServerSentEvent]:
        decoder = SSEDecoder()
        turn = HubTurn()
        async for chunk in iterator:
            for event in decoder.decode(chunk):
                yield self._sse(event)
            await turn.atake()
        for event in decoder.flush():
            yield self._sse(event)

    def end(self) -> list[tuple[None, str]]:
        """After the SDK's iteration ended by itself: the [DONE] it swallowed (or an event it took for one,
        `[DONE]…`) for the core to judge; nothing when the body just ended."""
        return [(None, self.last_data)] if self.last_data.startswith(DONE) else []


class EventDecoderMixin:
    """Mixin for OpenAI/AsyncOpenAI: hand out EventDecoders; the last one is the current stream's (one stream at
    a time per client)."""

    last_decoder: EventDecoder | None = None

    def _make_sse_decoder(self) -> EventDecoder:
        self.last_decoder = EventDecoder()
        return self.last_decoder


def api_key_of(request: StreamRequest) -> str:
    """The key the request carries as a Bearer token, or vLLM's customary placeholder."""
    auth = request.headers.get("Authorization", "")
    return auth.removeprefix("Bearer ") or "EMPTY"


def call_args(request: StreamRequest, timeout: float, connect_timeout: float = 10.0) -> dict[str, Any]:
    """create()'s keyword arguments for our request: the same body on the wire as every other stack sends."""
    body = request.body
    kwargs: dict[str, Any] = {k: body[k] for k in _TYPED if k in body}
    extra = {k: v for k, v in body.items() if k not in kwargs and k != "stream"}
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-type"}  # X-Request-Id, auth...
    kwargs.update(stream=True, extra_headers=headers, timeout=openai.Timeout(timeout, connect=connect_timeout))
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


def status_failure(exc: openai.APIStatusError) -> StreamFailure:
    headers = exc.response.headers
    if exc.status_code < 400:  # a redirect (the client follows none): the SDK raises for any status not 2xx
        return StreamFailure(response_failure(exc.status_code, headers.get("content-type"),
                                              headers.get("content-encoding"), headers.get("location"))
                             or f"HTTP {exc.status_code}")
    try:
        message = error_text(exc.response.content)
    except Exception:  # the body was not read (the SDK closed it): its own words will do
        message = exc.message
    return StreamFailure(f"HTTP {exc.status_code}: {message}")


def stream_failure(response: Any) -> str | None:
    """The verdict on a response the SDK took for a stream (any 2xx): status, Content-Type, encoding."""
    h = response.headers
    return response_failure(response.status_code, h.get("content-type"), h.get("content-encoding"),
                            h.get("location"))


def describe_openai_error(exc: Exception, timeout: float, mid_stream: bool) -> str:
    """One SDK exception in words (shared with the async twin)."""
    cause = exc.__cause__
    detail = f"{cause}" if cause is not None and str(cause) else str(exc)
    if isinstance(exc, openai.APITimeoutError):
        if type(cause).__name__ == "ConnectTimeout":  # httpx2's, under the SDK: no connection, not a silent server
            return connect_timed_out("ConnectTimeout")
        return f"timeout: no byte for {timeout:g} s ({type(cause or exc).__name__})"
    if isinstance(exc, openai.APIConnectionError):
        if mid_stream:
            return f"stream cut off: connection broken mid-stream ({detail})"
        return f"connection error: {detail}"
    if isinstance(exc, openai.APIError) and mid_stream:
        return f"server error mid-stream: {exc.message}"  # vLLM's `data: {"error": ...}` event
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed stream: {exc}"
    return f"{type(exc).__name__}: {exc}"


class _OpenAIStream:
    __slots__ = ("_chunks", "_decoder", "_stream", "_timeout", "arrival")

    def __init__(self, stream: openai.Stream[Any], decoder: EventDecoder, timeout: float,
                 sock: StampingSocket | None) -> None:
        self._stream = stream
        self._chunks = iter(stream)
        self._decoder = decoder
        self._timeout = timeout
        # The kernel's receive time of the last bytes read: the SDK's iterator reads no further than the event it
        # yields (EventDecoder hands each read's events over before the next read)
        self.arrival = arrival_clock(sock)

    def items(self) -> Iterator[tuple[Any, str]]:
        decoder = self._decoder
        try:
            for chunk in self._chunks:
                yield chunk, decoder.last_data
        except openai.APIConnectionError as exc:  # timeouts too
            raise StreamFailure(describe_openai_error(exc, self._timeout, mid_stream=True)) from None
        except (openai.APIError, json.JSONDecodeError):  # an event the SDK refused: judged as every stack judges it
            yield None, decoder.last_data
            return
        except openai.OpenAIError as exc:
            raise StreamFailure(describe_openai_error(exc, self._timeout, mid_stream=True)) from None
        yield from decoder.end()

    def close(self) -> None:
        self._stream.close()


class _Client(EventDecoderMixin, openai.OpenAI):
    pass


class OpenAITransport:
    """One SDK client per user, built at the first stream (it needs the server's URL and key), over the SDK's
    default HTTP client with the process's one SSL context (users/tls.py): with a context of its own a client
    costs ~21 ms of CPU, inside the first stream's TTFT and blocking the hub."""

    name = "openai"
    yields_chunks = True

    def __init__(self, insecure: bool = False) -> None:
        self.clients: dict[str, _Client] = {}  # by host (one, under Locust)
        self.insecure = insecure

    def warm(self, host: str, api_key: str | None) -> None:
        """Build the client, and the SDK's lazily imported resources, before the first stream's send stamp:
        at the first `create()` they cost ~25 ms (once a process) plus the client's own build, inside that
        stream's TTFT (and, on the bridge, in front of every other user's request)."""
        client = self._client(host, api_key or "EMPTY")
        _ = client.chat.completions, client.completions

    def _client(self, host: str, api_key: str) -> _Client:
        client = self.clients.get(host)
        if client is None:
            http_client = openai.DefaultHttpxClient(verify=shared_ssl_context(HTTP_LIBRARY, self.insecure),
                                                    follow_redirects=False)
            install_on_client(http_client)  # kernel receive stamps over plain HTTP (users/httpcore_stamps.py)
            client = self.clients[host] = _Client(base_url=host + "/v1", api_key=api_key, max_retries=0,
                                                  http_client=http_client)
        return client

    def open(self, host: str, request: StreamRequest, record: StreamRecord, timeout: float,
             connect_timeout: float = 10.0) -> _OpenAIStream:
        client = self._client(host, api_key_of(request))
        create = client.chat.completions.create if request.endpoint == "chat" else client.completions.create
        try:
            stream = create(**call_args(request, timeout, connect_timeout))
        except openai.APIStatusError as exc:
            record.headers = time.monotonic()
            record.status = exc.status_code
            raise status_failure(exc) from None
        except openai.OpenAIError as exc:
            raise StreamFailure(describe_openai_error(exc, timeout, mid_stream=False)) from None
        sock = stamping_socket(stream.response)
        stamp_headers(record, sock)
        record.status = stream.response.status_code
        failure = stream_failure(stream.response)
        if failure is not None:
            stream.close()
            raise StreamFailure(failure)
        assert client.last_decoder is not None  # the SDK asked for one when it built the stream
        return _OpenAIStream(stream, client.last_decoder, timeout, sock)

    def shutdown(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()


class OpenAIUser(SyncStreamingUser):
    stack = "openai"
    transport_class = OpenAITransport
