"""Single streams through each client stack's transport, outside Locust's users: what the stack, accounting and
real-vLLM tests share (the probe runs its streams the same way)."""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from stopstorm.metrics.record import StreamRecord
from stopstorm.users.bridge import get_bridge
from stopstorm.users.core import arun_stream, run_stream
from stopstorm.users.options import RunSettings, build_settings
from stopstorm.users.policy import StopPlan
from stopstorm.users.request import StreamRequest
from stopstorm.users.stacks import is_async, transport_for

__all__ = ["HOLD_S", "LONG", "OPTIONS", "STOP_AT", "Streams", "ledger_id", "make_settings", "versions"]

STOP_AT = 20  # tokens read before Stop
LONG = 2000  # max_tokens (with ignore_eos) no stream can reach while we watch it: 10 s of 5 ms steps
HOLD_S = 0.6

OPTIONS: dict[str, Any] = {
    "endpoint": "chat", "model": "llm", "prompts": "", "max_tokens": LONG, "temperature": 0.0, "ignore_eos": True,
    "no_usage": False, "no_continuous_usage": False, "api_key": "", "stop_probability": 1.0,
    "stop_at": f"tokens:fixed:{STOP_AT}", "close_mix": "close:1", "hold_seconds": HOLD_S, "think_time": 0.0,
    "read_timeout": 30.0,
}


def versions() -> str:
    return ", ".join(f"{d} {version(d)}" for d in ("requests", "httpx", "geventhttpclient", "openai", "httpx2"))


def make_settings(host: str, **options: Any) -> RunSettings:
    """Settings as Locust's parsed options would give them (names from users/options.py)."""
    return build_settings(argparse.Namespace(**{**OPTIONS, **options}), host)


def ledger_id(record: StreamRecord) -> str:
    return ("chatcmpl-" if record.endpoint == "chat" else "cmpl-") + record.request_id


class Streams:
    """Single streams through each stack's transport (one per stack per host), outside Locust's users."""

    def __init__(self) -> None:
        self.bridge = get_bridge()
        self.transports: dict[str, Any] = {}

    def transport(self, stack: str) -> Any:
        if stack not in self.transports:
            self.transports[stack] = (self.bridge.run(lambda: transport_for(stack)) if is_async(stack)
                                      else transport_for(stack))
        return self.transports[stack]

    def prepare(self, stack: str, settings: RunSettings, mode: str, plan: StopPlan,
                request: StreamRequest | None = None) -> tuple[StreamRecord, Callable[[], None]]:
        """A stream's record (built as StreamingUser.new_stream builds it) and the call that runs the stream."""
        request = request or settings.requests.build(random.Random())
        record = StreamRecord(stack=stack, close_mode=mode, endpoint=request.endpoint,
                              request_id=request.request_id, stop_plan=str(plan), wall_start=time.time(),
                              sent=time.monotonic())
        transport = self.transport(stack)

        def go() -> None:
            if is_async(stack):
                self.bridge.run(lambda: arun_stream(transport, settings, request, record, plan))
            else:
                run_stream(transport, settings, request, record, plan)

        return record, go

    def run(self, stack: str, settings: RunSettings, mode: str, plan: StopPlan,
            request: StreamRequest | None = None) -> StreamRecord:
        """One stream, start to end (a hold included); returns its record."""
        record, go = self.prepare(stack, settings, mode, plan, request)
        go()
        return record

    def close(self) -> None:
        for stack, transport in self.transports.items():
            if is_async(stack):
                self.bridge.run(transport.shutdown, timeout=10)
            else:
                transport.shutdown()
        self.transports.clear()
