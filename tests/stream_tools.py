"""Single streams through each client stack's transport, outside Locust's users: what the stack, accounting and
real-vLLM tests share (users/single.py, the path the probe runs its streams through too)."""

from __future__ import annotations

import argparse
from importlib.metadata import version
from typing import Any

from stopstorm.metrics.record import StreamRecord
from stopstorm.users.options import RunSettings, build_settings
from stopstorm.users.single import SingleStreams

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


class Streams(SingleStreams):
    """Single streams through each stack's transport (one per stack per host), outside Locust's users: the
    users' own path (users/single.py), which the probe runs its streams through too."""
