"""CPU cost per event of metrics.sse on a realistic vLLM chat chunk: ``python benchmarks/bench_sse.py [--json F]``.

Also the whole per-chunk work of stopstorm's core on the raw-line path (`StreamReader.feed`: SSE rules,
orjson, the record's stamps and counts) against the least a bare loop does with the same lines (`startswith`,
orjson, the content check): the transport-free part of stopstorm's overhead, measured side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stopstorm.metrics.record import StreamRecord
from stopstorm.users.core import StreamReader
from stopstorm.users.policy import StopPlan
from stopstorm.users.sse import SSEDecoder, SSELineDecoder

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


def _line_data() -> int:
    feed = SSELineDecoder().feed_line_data
    feed(b": first line")  # the stream's first line takes the full rules (BOM check)
    n = 0
    for _ in range(N):
        feed(LINE)
        n += feed(b"") is not None
    return n


# Continuous usage, as stopstorm's users ask for: the payload the core really parses.
USAGE_LINES = [b'data: {"id":"chatcmpl-9f1c2b7e4a5d4c3b8e2f1a0b9c8d7e6f","object":"chat.completion.chunk",'
               b'"created":1732456789,"model":"Qwen/Qwen2.5-7B-Instruct","choices":[{"index":0,'
               b'"delta":{"content":" world"},"logprobs":null,"finish_reason":null}],'
               b'"usage":{"prompt_tokens":12,"total_tokens":%d,"completion_tokens":%d}}' % (13 + i, i + 1)
               for i in range(N)]


def _reader() -> int:
    rec = StreamRecord(stack="requests", close_mode="none", endpoint="chat", request_id="r", stop_plan="never",
                       wall_start=time.time(), sent=time.monotonic())
    feed = StreamReader(rec, StopPlan(), read_on=True).feed
    feed(b": first line", False)
    for line in USAGE_LINES:
        feed(line, False)
        feed(b"", False)
    return rec.tokens


def _bare_lines() -> int:
    loads = orjson.loads
    n = 0
    for line in USAGE_LINES:
        for item in (line, b""):
            if item.startswith(b"data: ") and item != b"data: [DONE]":
                choices = loads(item[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    n += 1
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the results here (benchmarks/results/ shape)")
    args = parser.parse_args()
    print(f"event: {len(EVENT)} bytes, {N} events x best of {REPEATS}, Python {sys.version.split()[0]}")
    cases = [
        ("SSEDecoder.decode, one event per chunk", _whole),
        ("SSEDecoder.decode, event split in 2 chunks", _halves),
        ("SSEDecoder.decode, 16 events per chunk", _batched),
        ("SSELineDecoder.feed_line (line + blank line)", _lines),
        ("SSELineDecoder.feed_line_data (fast path)", _line_data),
        ("orjson.loads(event.data), for comparison", _orjson),
        ("StreamReader.feed: a chunk into the record", _reader),
        ("bare loop: startswith + orjson + content", _bare_lines),
    ]
    rows = []
    for name, fn in cases:
        s = _best(fn)
        rows.append({"case": name, "us_per_event": s * 1e6})
        print(f"{name:<46} {s * 1e6:6.3f} us/event  {1 / s:12,.0f} events/s")
    if args.json:
        from results_doc import document, dumps  # beside this script
        from results_doc import table as results_table

        columns = [{"label": "case", "key": "case"},
                   {"label": "µs per event", "key": "us_per_event", "format": "{:.2f}", "align": "right"}]
        title = f"A {len(EVENT)}-byte vLLM chat chunk, {N // 1000}k events, best of {REPEATS}"
        doc = document("bench_sse", {"parse": results_table(columns, rows, title)})
        Path(args.json).write_text(dumps(doc) + "\n")


if __name__ == "__main__":
    main()
