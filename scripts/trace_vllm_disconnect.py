#!/usr/bin/env python3
"""Run vLLM's OpenAI server with its disconnect path traced: the experiment behind docs/guides/missed-closes.md.

Runs in the vLLM virtualenv's python (scripts/real_vllm.py's `RealVllm.launcher`, or
`repro_missed_close.py --trace`), in place of `-m vllm.entrypoints.openai.api_server`, with the same arguments.
It patches, in the API server process only and without editing any installed file:

* uvicorn's httptools protocol: when the connection's close is seen (`connection_lost`), whether the response
  had started and whether an ASGI `receive()` was waiting at that moment;
* the two disconnect listeners a streaming chat request has, one after the other: vLLM's
  `listen_for_disconnect` (run by `with_cancellation` beside the route handler) and Starlette's
  `StreamingResponse.listen_for_disconnect` (beside `stream_response`): when each starts, returns (the close was
  seen) or is cancelled;
* uvicorn's `send`: how many body writes were dropped because the connection was already gone.

Each event is one stderr line, `[stopstorm-trace] {json}`, with `t` on the monotonic clock (CLOCK_MONOTONIC is
system-wide on Linux, so a client on the same host can compare its own marks) and `rid` the X-Request-Id.

Two knobs vary the timing that a race would depend on, without changing anything else:

* `STOPSTORM_TRACE_DELAY_MS` (float, default 0): an `asyncio.sleep` at the start of Starlette's listener, which
  widens the gap between the two listeners (a close landing in it finds neither waiting);
* `STOPSTORM_TRACE_ACT_DELAY_MS` (float, default 0): an `asyncio.sleep` after Starlette's listener has seen the
  close and before it returns (which cancels the stream and so aborts the request): a server that sees a close
  and acts on it that much later, what the simulator's `--disconnect-delay-ms` models;
* `STOPSTORM_TRACE_STALL_MS` and `STOPSTORM_TRACE_STALL_EVERY_MS` (floats, default 0): a task that blocks the API
  server's event loop for STALL ms every EVERY ms, as a process starved of CPU is (the engine core and worker are
  other processes and keep generating meanwhile).
"""

from __future__ import annotations

import contextvars
import json
import os
import runpy
import sys
import time
from typing import Any

_RID: contextvars.ContextVar[str | None] = contextvars.ContextVar("stopstorm_rid", default=None)
_DELAY_S = float(os.environ.get("STOPSTORM_TRACE_DELAY_MS", "0") or 0) / 1e3
_ACT_DELAY_S = float(os.environ.get("STOPSTORM_TRACE_ACT_DELAY_MS", "0") or 0) / 1e3
_STALL_S = float(os.environ.get("STOPSTORM_TRACE_STALL_MS", "0") or 0) / 1e3
_STALL_EVERY_S = float(os.environ.get("STOPSTORM_TRACE_STALL_EVERY_MS", "0") or 0) / 1e3


def _emit(event: str, rid: str | None = None, **fields: Any) -> None:
    doc = {"t": round(time.monotonic(), 6), "ev": event, "rid": rid if rid is not None else _RID.get(), **fields}
    sys.stderr.write("[stopstorm-trace] " + json.dumps(doc) + "\n")
    sys.stderr.flush()


def _rid_of(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"x-request-id":
            return value.decode("latin-1")
    return None


def install() -> None:
    """Patch uvicorn, Starlette and vLLM's listener in this process (see the module docstring)."""
    import asyncio

    from starlette.responses import StreamingResponse
    from uvicorn.protocols.http import httptools_impl
    from vllm.entrypoints.serve.utils import api_utils

    cycle_cls = httptools_impl.RequestResponseCycle
    proto_cls = httptools_impl.HttpToolsProtocol

    orig_run_asgi = cycle_cls.run_asgi
    stall_task: list[asyncio.Task[None]] = []

    async def stall_loop() -> None:
        while True:
            await asyncio.sleep(_STALL_EVERY_S)
            time.sleep(_STALL_S)  # blocks the whole event loop, on purpose

    async def run_asgi(self: Any, app: Any) -> None:
        if _STALL_S and _STALL_EVERY_S and not stall_task:
            stall_task.append(asyncio.get_running_loop().create_task(stall_loop()))
        rid = _rid_of(self.scope)
        _RID.set(rid)  # every task this request creates copies this context
        self._stopstorm_waiting = 0
        self._stopstorm_dropped = 0
        _emit("asgi_start", rid, path=self.scope.get("path"))
        try:
            await orig_run_asgi(self, app)
        finally:
            _emit("asgi_end", rid, dropped_writes=self._stopstorm_dropped, disconnected=self.disconnected,
                  response_complete=self.response_complete)

    cycle_cls.run_asgi = run_asgi

    orig_receive = cycle_cls.receive

    async def receive(self: Any) -> Any:
        self._stopstorm_waiting = getattr(self, "_stopstorm_waiting", 0) + 1
        try:
            return await orig_receive(self)
        finally:
            self._stopstorm_waiting -= 1

    cycle_cls.receive = receive

    orig_send = cycle_cls.send

    async def send(self: Any, message: Any) -> None:
        if self.disconnected:
            self._stopstorm_dropped = getattr(self, "_stopstorm_dropped", 0) + 1
        await orig_send(self, message)

    cycle_cls.send = send

    orig_lost = proto_cls.connection_lost

    def connection_lost(self: Any, exc: Exception | None) -> None:
        cycle = self.cycle
        if cycle is not None:
            _emit("conn_lost", _rid_of(cycle.scope), exc=type(exc).__name__ if exc else None,
                  response_started=cycle.response_started, response_complete=cycle.response_complete,
                  receivers_waiting=getattr(cycle, "_stopstorm_waiting", 0))
        orig_lost(self, exc)

    proto_cls.connection_lost = connection_lost

    def traced(name: str, listener: Any, delay_s: float = 0.0, act_delay_s: float = 0.0) -> Any:
        async def run(*args: Any) -> None:
            _emit(name + "_start")
            try:
                if delay_s:
                    await asyncio.sleep(delay_s)
                await listener(*args)
                _emit(name + "_fired")
                if act_delay_s:
                    await asyncio.sleep(act_delay_s)
                    _emit(name + "_acting")
            except asyncio.CancelledError:
                _emit(name + "_cancelled")
                raise

        return run

    # vLLM's with_cancellation looks its listener up as a module global at call time.
    api_utils.listen_for_disconnect = traced("vllm_listener", api_utils.listen_for_disconnect)
    orig_sr_listen = StreamingResponse.listen_for_disconnect
    StreamingResponse.listen_for_disconnect = traced(  # type: ignore[method-assign]
        "starlette_listener", orig_sr_listen, _DELAY_S, _ACT_DELAY_S)

    orig_stream = StreamingResponse.stream_response

    async def stream_response(self: Any, send_: Any) -> None:
        _emit("stream_start")
        try:
            await orig_stream(self, send_)
        except asyncio.CancelledError:
            _emit("stream_cancelled")
            raise
        _emit("stream_end")

    StreamingResponse.stream_response = stream_response  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    sys.argv[0] = "vllm.entrypoints.openai.api_server"
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
