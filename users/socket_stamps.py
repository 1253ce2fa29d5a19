"""Stamps taken at the socket: when the kernel received a stream's bytes, and when the request was written.

Why: under gevent a read waits its turn behind every other greenlet of the process, so a chunk stamped when the
parser gets it carries the load generator's own queueing (issue 21 measured 62-117 ms at p99 with 64 streams a
process, against a server that sent each chunk on time). Linux stamps every TCP segment as it arrives; with
`SO_TIMESTAMPNS` set, `recvmsg` hands that stamp back, so a read that ran late still knows when its bytes came.

`StampingSocket` wraps the plain-TCP socket a library reads (urllib3's connection for requests, geventhttpclient's
pooled socket for fasthttp, httpcore's stream for httpx and the openai SDK: users/httpcore_stamps.py) and reads
through `recvmsg` instead of `recv`; everything else is the socket's own.
The stamp of a read is the arrival of the last segment it returned, which is when a line that read completed
became readable. Not for TLS (an `SSLSocket` has no `recvmsg`, and its records are decrypted in user space): such
streams keep the read clock, and the record says which clock stamped it (`StreamRecord.stamp_clock`).
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from stopstorm.metrics.record import StreamRecord

__all__ = ["KERNEL", "READ", "StampingSocket", "Stamps", "arrival_clock", "enable_receive_stamps", "stamp_headers"]

KERNEL = "kernel"  # chunk stamps are the kernel's receive time of their bytes
READ = "read"  # chunk stamps are taken when the parser got the bytes (after any wait for the hub)

# Linux's values (asm-generic/socket.h; Python does not export them): SO_TIMESTAMPNS asks for a struct timespec
# of CLOCK_REALTIME with each read, delivered as an SCM_TIMESTAMPNS control message.
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
_TIMESPEC = struct.Struct("@qq")
_TIMESPEC_SIZE = _TIMESPEC.size
_unpack = _TIMESPEC.unpack_from
_SOL_SOCKET = socket.SOL_SOCKET
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0
# Off only to measure the read clock beside the kernel's on the same stacks (benchmarks/bench_timing.py
# --read-clock-too); sockets connected while it is off stay unstamped.
RECEIVE_STAMPS = True


class Stamps(Protocol):
    """What a stack's connection knows of its bytes: the last read's arrival, the last write's start, and which
    clock took them (StampingSocket: the kernel's; users/httpcore_stamps.py's StampedAsyncStream: the loop's)."""

    @property
    def clock(self) -> str: ...
    @property
    def arrival(self) -> float | None: ...
    @property
    def written(self) -> float | None: ...


def enable_receive_stamps(sock: Any) -> bool:
    """Ask the kernel to stamp what `sock` receives; False where it cannot (not Linux, not a TCP socket, TLS)."""
    if not (RECEIVE_STAMPS and sys.platform.startswith("linux") and _ANCILLARY and hasattr(sock, "recvmsg_into")):
        return False
    if hasattr(sock, "getpeercert"):  # TLS: an SSL socket's recvmsg refuses, and its bytes are decrypted above it
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


class StampingSocket:
    """A socket whose reads remember when the kernel received their bytes (`arrival`, time.monotonic's clock)
    and whose writes are stamped as they begin (`written`). Every other attribute is the wrapped socket's."""

    clock = KERNEL
    __slots__ = ("_recvmsg", "_recvmsg_into", "_sock", "arrival", "written")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._recvmsg = sock.recvmsg
        self._recvmsg_into = sock.recvmsg_into
        self.arrival: float | None = None  # the last read's kernel stamp, None before the first stamped read
        self.written: float | None = None  # just before the last write began

    def _stamp(self, ancillary: list[tuple[int, int, bytes]]) -> None:
        # One control message was asked for: the timestamp, or none when the kernel did not stamp the segment
        now = time.monotonic()
        if ancillary:
            level, kind, data = ancillary[0]
            if kind == SCM_TIMESTAMPNS and level == _SOL_SOCKET and len(data) >= _TIMESPEC_SIZE:
                sec, nsec = _unpack(data)
                # CLOCK_REALTIME to monotonic at this instant; never later than now (the bytes are here)
                at = sec + nsec * 1e-9 - (time.time() - now)
                self.arrival = at if at < now else now
                return
        self.arrival = now  # no stamp came (timestamping was off for this segment): the read clock

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        n, ancillary, _flags, _addr = self._recvmsg_into([memoryview(buffer)[:nbytes]] if nbytes else [buffer],
                                                         _ANCILLARY, flags)
        if n:
            self._stamp(ancillary)
        return int(n)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data, ancillary, _flags, _addr = self._recvmsg(bufsize, _ANCILLARY, flags)
        if data:
            self._stamp(ancillary)
        return data

    def sendall(self, data: Any, flags: int = 0) -> None:
        # Stamped before the call, and the last call wins (urllib3 writes the head, then the body): the server
        # cannot answer before the last write starts, so a TTFT from here is never shorter than the server's
        # own. Stamped after it returned, a process preempted between the syscall and the stamp (two CPU hogs)
        # let the first token arrive before the stamp: a TTFT below the server's, even negative.
        self.written = time.monotonic()
        self._sock.sendall(data, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        # httpcore writes with send() in a loop: stamped as each call begins, the last one wins (see sendall)
        self.written = time.monotonic()
        return int(self._sock.send(data, flags))

    @property
    def raw(self) -> Any:
        """The wrapped socket (httpcore hands it to TLS, which reads it in C: no stamps there)."""
        return self._sock

    def makefile(self, *args: Any, **kwargs: Any) -> Any:
        """The socket's own file (its reference counting kept), reading through this wrapper."""
        f = self._sock.makefile(*args, **kwargs)
        raw = getattr(f, "raw", f)
        if isinstance(getattr(raw, "_sock", None), type(self._sock)):
            raw._sock = self  # socket.SocketIO reads with self._sock.recv_into
        return f

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def __repr__(self) -> str:
        return f"<StampingSocket {self._sock!r}>"


def stamp_headers(record: StreamRecord, stamps: Stamps | None) -> None:
    """The response's headers are in: stamped with the arrival of their bytes, and the request's write kept (TTFT
    counts from it), where the stack's connection stamps both (`stamps.clock` says how); else with the parser's
    read clock, now."""
    if stamps is not None and stamps.arrival is not None and stamps.written is not None:
        record.headers, record.written, record.stamp_clock = stamps.arrival, stamps.written, stamps.clock
    else:
        record.headers = time.monotonic()


def arrival_clock(stamps: Stamps | None) -> Callable[[], float] | None:
    """What a stack's stream hands users/core.py's StreamReader as `arrival`: the arrival of the last bytes read
    (now, before the first stamped read); None, the parser's read clock, for a connection that stamps nothing."""
    return None if stamps is None else (lambda: stamps.arrival or time.monotonic())
