"""Token text and prompt sizes for the simulator: cheap, deterministic, and shaped like a real model's output.

Every token is a short word piece (some multi-byte UTF-8, so clients' decoders are exercised), already
JSON-escaped, so a chunk is built by joining bytes: the HTTP writer does no JSON work per token.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import orjson

__all__ = ["TokenText", "count_prompt_tokens"]

_VOCABULARY = (
    "the of and to in is that for it as with was on be by this are from at or an which have not has but can "
    "all more one its were their been also would other when into than only such these may some time two "
    "first new after most used like where over between both many then through same under well while "
    "Bayes theorem prior posterior likelihood evidence probability event proof given therefore hence data "
    "model token stream server client stop slot queue request batch step decode prefill cache latency "
    "贝叶斯 定理 证明 概率 应用 café naïve résumé — … ✓"
)
_PIECES = (*(f" {w}" for w in _VOCABULARY.split()), ".", ",", "\n\n", ":", ";")
_ESCAPED = tuple(orjson.dumps(p)[1:-1] for p in _PIECES)
_TEXT_STRIDE = 7  # coprime with the number of pieces, so a request cycles through all of them
assert math.gcd(_TEXT_STRIDE, len(_PIECES)) == 1


class TokenText:
    """The pieces one request generates: piece i depends only on the request id and i."""

    __slots__ = ("_start",)

    def __init__(self, request_id: str) -> None:
        self._start = zlib.crc32(request_id.encode())

    def escaped(self, first: int, stop: int) -> bytes:
        """Tokens [first, stop) as the inside of a JSON string literal."""
        n, start = len(_ESCAPED), self._start
        return b"".join(_ESCAPED[(start + i * _TEXT_STRIDE) % n] for i in range(first, stop))

    def text(self, first: int, stop: int) -> str:
        n, start = len(_PIECES), self._start
        return "".join(_PIECES[(start + i * _TEXT_STRIDE) % n] for i in range(first, stop))


def count_prompt_tokens(payload: Any) -> int:
    """Prompt size the way a BPE tokenizer roughly sees it: one token per 4 bytes of UTF-8, at least one.

    Chat messages add 4 tokens each for the chat template; a completions prompt given as token ids counts
    exactly. Raises ValueError for shapes vLLM would reject.
    """
    if isinstance(payload, str):
        return max(1, (len(payload.encode()) + 3) // 4)
    if isinstance(payload, list) and payload and all(isinstance(t, int) for t in payload):
        return len(payload)
    if isinstance(payload, list) and payload and all(isinstance(m, dict) for m in payload):
        total = 0
        for message in payload:
            content = message.get("content", "")
            if isinstance(content, list):  # content parts: count the text ones
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise ValueError("message content must be a string or a list of content parts")
            total += 4 + (len(content.encode()) + 3) // 4
        return total
    raise ValueError("expected a prompt string, a list of token ids or a non-empty list of messages")
