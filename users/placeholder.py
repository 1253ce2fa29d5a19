"""A first streaming user: one chat completion per task with `requests`, timed to the last chunk.

It stands in until the per-stack users land; it already fires its Locust event after the stream ends, because
Locust's own sessions stop the clock at the response headers, which for a stream says nothing.
"""

from __future__ import annotations

import time

import requests
from locust import User, task

__all__ = ["ChatStreamUser"]

_PAYLOAD = {
    "messages": [{"role": "user", "content": "Prove Bayes' theorem step by step, with examples of its use."}],
    "stream": True,
    "max_tokens": 128,
    "stream_options": {"include_usage": True},
}


class ChatStreamUser(User):
    """Streams one chat completion to its end and reports it as `chat stream` (length: data events)."""

    def on_start(self) -> None:
        self.session = requests.Session()

    def on_stop(self) -> None:
        self.session.close()

    @task
    def stream_chat(self) -> None:
        start = time.perf_counter()
        events, exc = 0, None
        try:
            with self.session.post(f"{self.host}/v1/chat/completions", json=_PAYLOAD, stream=True,
                                   timeout=(5, 60)) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if line.startswith(b"data:"):
                        events += 1
        except requests.RequestException as err:
            exc = err
        self.environment.events.request.fire(
            request_type="POST", name="chat stream", response_time=(time.perf_counter() - start) * 1e3,
            response_length=events, exception=exc, context={},
        )
