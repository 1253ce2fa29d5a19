"""One SSL context per process, library and `--insecure`, shared by every client the users build.

Building an `httpx` (or the openai SDK's `httpx2`) client costs ~21 ms of CPU, nearly all of it the SSL
context it creates (loading the CA bundle), even for a plain-http host; handed a ready context the same client
costs 0.07 ms, and an `AsyncOpenAI` over it 0.85 ms (measured here). Every async user builds its client on the
one bridge loop, so 64 users starting at once stalled that loop for seconds (issue 21: the first requests
reached the server 3.8 s after their send stamp). A context is made to be shared by many connections, so each
user keeps its own client, pool and connections (what `close` and `drop` act on are exactly as before) and only
the context is shared.

The context is the library's own default (`create_ssl_context(verify=…, trust_env=True)`: certifi's bundle,
or `SSL_CERT_FILE` / `SSL_CERT_DIR` from the environment, as the client would have built it), one per library
because httpx and httpx2 may set theirs up differently. Contexts are created on first use, under a real lock,
and a forked child makes its own.
"""

from __future__ import annotations

import importlib
import os
import ssl
from collections.abc import Callable
from typing import Any

from gevent.monkey import get_original

__all__ = ["shared_ssl_context"]

_lock = get_original("_thread", "allocate_lock")()  # a real lock: the hub's greenlets and the bridge thread call this
_contexts: dict[tuple[int, str, bool], ssl.SSLContext] = {}


def shared_ssl_context(library: str, insecure: bool = False) -> ssl.SSLContext:
    """The process's context for `library` (an httpx-family module: "httpx", or "httpx2" under which the openai
    SDK 3.x talks): verifying, or with `insecure` not."""
    key = (os.getpid(), library, insecure)
    ctx = _contexts.get(key)
    if ctx is None:
        with _lock:
            ctx = _contexts.get(key)
            if ctx is None:
                ctx = _contexts[key] = _factory(library)(verify=not insecure, trust_env=True)
    return ctx


def _factory(library: str) -> Callable[..., Any]:
    if library not in ("httpx", "httpx2"):
        raise ValueError(f"no SSL context for library {library!r}; choose httpx or httpx2")
    return importlib.import_module(library).create_ssl_context
