"""The client stacks by name: the one place that knows which user class (and transport) each name means.

Used by the probe and tests, which run single streams with a stack's transport outside Locust's users, and by
anything that takes a stack name from the command line. An unknown name's error lists the valid ones.
"""

from __future__ import annotations

from typing import Any

from stopstorm.users.core import AsyncStreamingUser, StreamingUser
from stopstorm.users.stack_fasthttp import FastHttpStreamUser
from stopstorm.users.stack_httpx import HttpxUser
from stopstorm.users.stack_httpx_async import HttpxAsyncUser
from stopstorm.users.stack_openai import OpenAIUser
from stopstorm.users.stack_openai_async import OpenAIAsyncUser
from stopstorm.users.stack_requests import RequestsUser

__all__ = ["STACKS", "is_async", "transport_for", "user_class"]

STACKS: dict[str, type[StreamingUser]] = {
    cls.stack: cls
    for cls in (RequestsUser, HttpxUser, HttpxAsyncUser, OpenAIUser, OpenAIAsyncUser, FastHttpStreamUser)
}


def user_class(name: str) -> type[StreamingUser]:
    """The Locust user class of stack `name`; ValueError naming the valid stacks for an unknown one."""
    try:
        return STACKS[name]
    except KeyError:
        raise ValueError(f"unknown client stack {name!r}; choose from {', '.join(STACKS)}") from None


def is_async(name: str) -> bool:
    """True for stacks whose transport is asyncio's: run them with `arun_stream` on the bridge."""
    return issubclass(user_class(name), AsyncStreamingUser)


def transport_for(name: str, insecure: bool = False) -> Any:
    """A new transport of stack `name` (a SyncTransport, or for async stacks an AsyncTransport that must be
    built inside the bridge's loop: `get_bridge().run(lambda: transport_for(name))`), built as the stack's
    users build theirs (`insecure`: --insecure)."""
    return user_class(name).transport_class(insecure=insecure)  # type: ignore[attr-defined]
