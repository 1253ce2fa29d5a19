"""CPU cost per event of metrics.sse on a realistic vLLM chat chunk: ``python benchmarks/bench_sse.py``."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metrics.sse import SSEDecoder, SSELineDecoder

N = 200_000  # events per repeat
REPEATS = 5

PAYLOAD = (
    b'{"id":"chatcmpl-9f1c2b7e4a5d4c3b8e2f1a0b9c8d7e6f","object":"chat.completion.chunk",'
    b'"created":1732456789,"model":"Qwen/Qwen2.5-7B-Instruct","choices":[{"index":0,'
    b'"delta":{"content":" world"},"logprobs":null,"finish_reason":null}]}'
)
LINE = b"data: " + PAYLOAD
EVENT = LINE + b"\n\n"


def _whole() -> int:
    decode = SSEDecoder().decode
    return sum(len(decode(EVENT)) for _ in range(N))


def _halves() -> int:
    decode = SSEDecoder().decode
    a, b = EVENT[: len(EVENT) // 2], EVENT[len(EVENT) // 2 :]
    n = 0
    for _ in range(N):
        decode(a)
        n += len(decode(b))
    return n


def _batched() -> int:
    decode = SSEDecoder().decode
    chunk = EVENT * 16
    return sum(len(decode(chunk)) for _ in range(N // 16))


def _lines() -> int:
    feed = SSELineDecoder().feed_line
    n = 0
    for _ in range(N):
        feed(LINE)
        n += feed(b"") is not None
    return n


def _orjson() -> int:
    data = PAYLOAD.decode()
    loads = orjson.loads
    for _ in range(N):
        loads(data)
    return N


def _best(fn: Callable[[], int]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        assert fn() == N, fn.__name__
        best = min(best, time.perf_counter() - t0)
    return best / N


def main() -> None:
    print(f"event: {len(EVENT)} bytes, {N} events x best of {REPEATS}, Python {sys.version.split()[0]}")
    cases = [
        ("SSEDecoder.decode, one event per chunk", _whole),
        ("SSEDecoder.decode, event split in 2 chunks", _halves),
        ("SSEDecoder.decode, 16 events per chunk", _batched),
        ("SSELineDecoder.feed_line (line + blank line)", _lines),
        ("orjson.loads(event.data), for comparison", _orjson),
    ]
    for name, fn in cases:
        s = _best(fn)
        print(f"{name:<46} {s * 1e6:6.3f} us/event  {1 / s:12,.0f} events/s")


if __name__ == "__main__":
    main()
