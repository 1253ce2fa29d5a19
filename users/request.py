"""What every stack sends: one OpenAI-wire streaming request, built once so no stack sends something else.

Prompts come from a built-in varied set or a user's file: plain text (one prompt a line) or JSONL (one chat
`{"messages": [...]}` object, or a bare list of messages, a line).
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = ["BUILTIN_PROMPTS", "RequestFactory", "StreamRequest", "load_prompts"]

Messages = list[dict[str, Any]]

_log = logging.getLogger("stopstorm")

BUILTIN_PROMPTS: tuple[str, ...] = (
    "你好,帮我证明贝叶斯定理,给出详细的推导过程,及其应用领域的案例",
    "Prove Bayes' theorem step by step and give three applications.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how continuous batching works in an LLM inference server, with an example schedule.",
    "Summarise the causes of the French Revolution in five bullet points.",
    "Translate into French: 'The stop button should stop the GPU, not just the screen.'",
    "Write a Python function that merges overlapping intervals, and explain its complexity.",
    "List ten creative names for a coffee shop run by cats.",
    "What is the difference between TCP back-pressure and application-level flow control?",
    "Draft a polite email asking a colleague to review a pull request by Friday.",
    "Describe the water cycle to a ten-year-old.",
    "Give a detailed recipe for a vegetarian lasagne.",
)


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """One request, ready for any client: path, JSON body (as a dict and as bytes) and headers."""

    endpoint: str  # chat or completions
    path: str
    body: dict[str, Any]
    body_bytes: bytes
    headers: dict[str, str]
    request_id: str


def load_prompts(path: str) -> list[Messages]:
    """Prompts from a file: JSONL of messages (or {"messages": [...]}) or plain text, one prompt a line."""
    file = Path(path)
    try:
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise ValueError(f"--prompts {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"--prompts {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                         f"{exc.start}); give a text or JSONL file of prompts") from None
    if not lines:
        raise ValueError(f"--prompts {path}: no prompts in the file")
    out: list[Messages] = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped[0] in "[{":
            try:
                value = orjson.loads(stripped)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"--prompts {path}:{number}: not valid JSON: {exc}") from None
            messages = value.get("messages") if isinstance(value, dict) else value
            if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
                raise ValueError(f"--prompts {path}:{number}: expected a list of messages or {{\"messages\": [...]}}")
            out.append(messages)
        else:
            out.append([{"role": "user", "content": stripped}])
    return out


class RequestFactory:
    """Builds requests with the run's settings; the prompt is drawn at random per request."""

    def __init__(self, *, endpoint: str, model: str, prompts: list[Messages], max_tokens: int,
                 temperature: float, ignore_eos: bool, include_usage: bool, continuous_usage: bool,
                 api_key: str | None, authorization: str | None = None,
                 discover: Callable[[], list[str]] | None = None) -> None:
        if endpoint not in ("chat", "completions"):
            raise ValueError(f"--endpoint must be chat or completions, got {endpoint!r}")
        self.endpoint = endpoint
        self.path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        self.model = model
        self.prompts = prompts
        self.params: dict[str, Any] = {"model": model, "stream": True, "max_tokens": max_tokens,
                                       "temperature": temperature}
        if ignore_eos:
            self.params["ignore_eos"] = True
        if include_usage:
            self.params["stream_options"] = {"include_usage": True, "continuous_usage_stats": continuous_usage}
        # The API key as a Bearer token; without one, `authorization` (Basic, from a --host's userinfo) if given
        auth = f"Bearer {api_key}" if api_key else authorization
        self._auth = {"Authorization": auth} if auth else {}
        # No model yet (the server did not answer at the start, no --model): asked again before each stream until
        # it answers, so no stream reaches a server that is up without one (a refused connect costs nothing; a
        # silent host costs --connect-timeout, which the stream itself would have waited)
        self._discover = discover if not model else None

    def _model(self) -> str:
        if self._discover is not None:
            try:
                models = self._discover()
            except ValueError:
                return self.model  # still unavailable: this stream goes out as it is and fails as the server does
            self.model, self._discover = models[0], None
            self.params["model"] = self.model
            _log.info("stopstorm: the server answers now; model %r", self.model)
        return self.model

    def build(self, rng: random.Random) -> StreamRequest:
        request_id = uuid.uuid4().hex
        self._model()
        messages = rng.choice(self.prompts)
        body = dict(self.params)
        if self.endpoint == "chat":
            body["messages"] = messages
        else:
            body["prompt"] = "\n".join(str(m.get("content", "")) for m in messages)
        # identity: a compressed stream would hold tokens back in the decompressor (and FastHttp does not decode
        # it); a server that compresses anyway is named by users/verdicts.py
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", "X-Request-Id": request_id,
                   **self._auth}
        return StreamRequest(self.endpoint, self.path, body, orjson.dumps(body), headers, request_id)
