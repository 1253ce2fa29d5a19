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
"""

from __future__ import annotations

import contextlib
import importlib
import socket
from functools import cache
from typing import Any

from stopstorm.users.socket_stamps import SO_TIMESTAMPNS, StampingSocket, enable_receive_stamps

__all__ = ["install", "install_on_client", "stamping_socket"]


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
