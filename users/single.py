"""Single streams through any stack's transport, outside Locust's users: the one path the stop-semantics probe,
the tests and the benchmarks share with the users themselves.

A stream here is built, run and sealed exactly as a `StreamingUser`'s is (`stream_record`, `run_stream` /
`arun_stream`, `seal`), on a transport built as the stack's users build theirs, with the run's settings: so
`--insecure`, the timeouts and every other stream option reach it. Async stacks run on the one bridge.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from stopstorm.metrics.record import StreamRecord
from stopstorm.users.bridge import get_bridge
from stopstorm.users.core import arun_stream, run_stream, seal, stream_record, watch_hub
from stopstorm.users.options import RunSettings
from stopstorm.users.policy import StopPlan
from stopstorm.users.request import StreamRequest
from stopstorm.users.stacks import is_async, transport_for

__all__ = ["SingleStreams"]


class SingleStreams:
    """One transport per stack (built at its first stream, shut down by `shutdown` or `close`)."""

    def __init__(self, insecure: bool = False) -> None:
        self.insecure = insecure
        self.bridge = get_bridge()
        self.transports: dict[str, Any] = {}

    def transport(self, stack: str) -> Any:
        if stack not in self.transports:
            insecure = self.insecure
            self.transports[stack] = (self.bridge.run(lambda: transport_for(stack, insecure)) if is_async(stack)
                                      else transport_for(stack, insecure))
        return self.transports[stack]

    def prepare(self, stack: str, settings: RunSettings, mode: str, plan: StopPlan,
                request: StreamRequest | None = None) -> tuple[StreamRecord, Callable[[], None]]:
        """A stream's record (built as StreamingUser.new_stream builds it) and the call that runs the stream."""
        request = request or settings.requests.build(random.Random())
        record = stream_record(stack, request, mode, plan)
        transport = self.transport(stack)

        def go() -> None:
            try:
                if is_async(stack):
                    watch_hub()  # the hub's beat, which the stream's turns on the bridge read
                    self.bridge.run(lambda: arun_stream(transport, settings, request, record, plan))
                else:
                    run_stream(transport, settings, request, record, plan)
            finally:
                seal(record)

        return record, go

    def run(self, stack: str, settings: RunSettings, mode: str, plan: StopPlan,
            request: StreamRequest | None = None) -> StreamRecord:
        """One stream, start to end (a hold included); returns its record."""
        record, go = self.prepare(stack, settings, mode, plan, request)
        go()
        return record

    def shutdown(self, stack: str) -> None:
        transport = self.transports.pop(stack, None)
        if transport is None:
            return
        if is_async(stack):
            self.bridge.run(transport.shutdown, timeout=10)
        else:
            transport.shutdown()

    def close(self) -> None:
        for stack in list(self.transports):
            self.shutdown(stack)
