"""Kernel receive stamps for the httpx family (httpx's httpcore, and httpcore2 under the openai SDK's httpx2).

Why: the httpx and openai stacks read through httpcore's `SyncStream`, whose socket the library makes itself, so
their chunks were stamped when the parser got them, after any wait for the hub (users/socket_stamps.py says why
that is late under load). httpcore takes a network backend per connection pool; this one connects as httpcore's
own `SyncBackend` does and hands the pool a stream over a `StampingSocket`, so reads go through `recvmsg` with
the kernel's receive time and writes are stamped as they begin. The response's `network_stream` extension then
gives that socket to the transport (`stamping_socket`).

Plain HTTP only: at `start_tls` (an https:// URL, or a tunnel through a proxy) the stream drops the wrapper and
the stamps, so TLS is httpcore's own, and such streams keep the read clock. httpcore has no public way to set
the backend of a transport httpx built (its `HTTPTransport` takes none), so `install` sets the pool's
`_network_backend`, and where that attribute is not what it expects it leaves the transport alone: the stamps
are lost, never the stream.

The async stacks (httpx-async, openai-async) run on the bridge's asyncio loop, whose transports read the socket
themselves (uvloop's in C): no kernel stamps there. Their pool gets a backend whose streams stamp each write as
it begins and each read as it returns (`StampedAsyncStream`), so TTFT counts from the request's write, not from
before the SDK built it (~2 ms a request of the openai SDK's own work, queued 64 deep on one loop at a 64-user
start: issue 21), and a chunk's stamp is the network read's, before the SDK parses it into a model. Read-clock
stamps still: a read the loop ran late is stamped late, and the record says so (`stamp_clock` "read").
"""

from __future__ import annotations

import contextlib
import importlib
import socket
import time
from functools import cache
from typing import Any

from stopstorm.users.socket_stamps import READ, SO_TIMESTAMPNS, StampingSocket, enable_receive_stamps

__all__ = ["StampedAsyncStream", "install", "install_async_on_client", "install_on_client", "stamped_stream",
           "stamping_socket"]


@cache
def _backend_class(core: str) -> type | None:
    """A SyncBackend of the httpcore-family module `core` ("httpcore", "httpcore2") whose plain-TCP streams
    read through a StampingSocket; None when that module is not the shape this was written against."""
    try:
        sync = importlib.import_module(f"{core}._backends.sync")
        base_stream, base_backend = sync.SyncStream, sync.SyncBackend
    except (ImportError, AttributeError):
        return None

    class StampingStream(base_stream):  # type: ignore[misc, valid-type]
        def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                      timeout: float | None = None) -> Any:
            sock: Any = self.__dict__.get("_sock")  # httpcore's SyncStream keeps its socket here
            if isinstance(sock, StampingSocket):  # TLS reads are decrypted above the socket: no stamps there
                self._sock = sock.raw
                with contextlib.suppress(OSError):
                    sock.raw.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 0)
            return super().start_tls(ssl_context, server_hostname, timeout)

    class StampingBackend(base_backend):  # type: ignore[misc, valid-type]
        def connect_tcp(self, *args: Any, **kwargs: Any) -> Any:
            stream = super().connect_tcp(*args, **kwargs)
            sock = stream.get_extra_info("socket")
            if sock is None or not enable_receive_stamps(sock):
                return stream
            return StampingStream(StampingSocket(sock))

    return StampingBackend


def install(transport: Any) -> bool:
    """Give `transport` (an httpx or httpx2 `HTTPTransport`) a stamping network backend for the connections it
    makes from now on; False where it cannot (another transport, another httpcore, a custom backend)."""
    pool: Any = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if backend is None:
        return False
    core = type(backend).__module__.split(".")[0]
    cls = _backend_class(core)
    if cls is None or type(backend) is not cls.__mro__[1]:  # only httpcore's own SyncBackend is replaced
        return False
    pool._network_backend = cls()
    return True


def install_on_client(client: Any) -> bool:
    """`install` on the default transport of an httpx/httpx2 `Client` (its `_transport`: the one for URLs no
    mount, such as an environment proxy's, takes), keeping every setting the client gave it."""
    return install(getattr(client, "_transport", None))


def stamping_socket(response: Any) -> StampingSocket | None:
    """The StampingSocket an httpx/httpx2 response is read from, or None (TLS, HTTP/2, not stamped)."""
    stream = getattr(response, "extensions", {}).get("network_stream")
    get = getattr(stream, "get_extra_info", None)
    sock = get("socket") if get is not None else None
    return sock if isinstance(sock, StampingSocket) else None


class StampedAsyncStream:
    """An httpcore/httpcore2 async network stream whose writes are stamped as they begin (`written`, the last
    one wins, as StampingSocket's) and whose reads are stamped as they return bytes (`arrival`): the loop's
    clock at the read, the earliest a library above the socket can know. Any async backend's stream, TLS too."""

    clock = READ
    __slots__ = ("_stream", "arrival", "written")

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.arrival: float | None = None
        self.written: float | None = None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data: bytes = await self._stream.read(max_bytes, timeout)
        if data:
            self.arrival = time.monotonic()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # Before the call: a TTFT from here is never shorter than the server's. Not for an empty write: httpcore
        # writes h11's end of a Content-Length body, b"", after the body, when the server may already have it.
        if buffer:
            self.written = time.monotonic()
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                        timeout: float | None = None) -> StampedAsyncStream:
        return StampedAsyncStream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _StampedAsyncBackend:
    """The pool's own async backend (httpcore's AutoBackend), its streams wrapped in StampedAsyncStream."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    async def connect_tcp(self, *args: Any, **kwargs: Any) -> StampedAsyncStream:
        return StampedAsyncStream(await self.backend.connect_tcp(*args, **kwargs))

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> StampedAsyncStream:
        return StampedAsyncStream(await self.backend.connect_unix_socket(*args, **kwargs))

    async def sleep(self, seconds: float) -> None:
        await self.backend.sleep(seconds)


def install_async_on_client(client: Any) -> bool:
    """Stamped streams for the connections an httpx/httpx2 `AsyncClient`'s default transport makes from now on;
    False where its pool is not httpcore's (another transport: its streams keep the parser's clock)."""
    pool: Any = getattr(getattr(client, "_transport", None), "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if backend is None or not hasattr(backend, "connect_tcp"):
        return False
    if not isinstance(backend, _StampedAsyncBackend):
        pool._network_backend = _StampedAsyncBackend(backend)
    return True


def stamped_stream(response: Any) -> StampedAsyncStream | None:
    """The StampedAsyncStream an async httpx/httpx2 response is read from, or None (HTTP/2, not installed)."""
    stream = getattr(response, "extensions", {}).get("network_stream")
    return stream if isinstance(stream, StampedAsyncStream) else None
