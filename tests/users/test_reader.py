"""users.core.StreamReader on the raw-line fast path: the same record as the full SSE rules would give."""

from __future__ import annotations

import time

from stopstorm.metrics.record import StreamRecord
from stopstorm.users.core import StreamReader
from stopstorm.users.policy import StopPlan


def _reader() -> StreamReader:
    rec = StreamRecord(stack="requests", close_mode="none", endpoint="chat", request_id="r", stop_plan="never",
                       wall_start=time.time(), sent=time.monotonic())
    return StreamReader(rec, StopPlan(), read_on=True)


def _chunk(content: bytes, n: int) -> bytes:
    return (b'data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"' + content
            + b'"},"finish_reason":null}],"usage":{"prompt_tokens":3,"completion_tokens":%d}}' % n)


def test_bytes_lines_fill_the_record_and_done_ends_it():
    reader = _reader()
    lines = [b": hello", _chunk(b"a", 1), b"", _chunk(b"b", 2), b"", b"data: [DONE]", b""]
    ends = [reader.feed(line, False) for line in lines]
    rec = reader.record
    assert ends == [False] * 6 + [True]
    assert (rec.tokens, rec.prompt_tokens, rec.server_id, rec.done, rec.error) == (2, 3, "chatcmpl-1", True, None)
    assert len(rec.chunk_times) == 2 and rec.chunk_times[0] <= rec.chunk_times[1] <= rec.ended


def test_invalid_utf8_in_a_fast_path_payload_is_replaced_not_a_failure():
    reader = _reader()
    reader.feed(b": x", False)
    for line in (_chunk(b"\xff", 1), b""):
        assert not reader.feed(line, False)
    assert reader.record.error is None and reader.record.tokens == 1


def test_malformed_payload_is_recorded():
    reader = _reader()
    reader.feed(b": x", False)
    reader.feed(b"data: {not json", False)
    assert reader.feed(b"", False) is True
    assert reader.record.error.startswith("malformed stream: JSONDecodeError")


def _finish(n: int) -> bytes:
    return (b'data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":""},"finish_reason":"length"}],'
            b'"usage":{"prompt_tokens":3,"completion_tokens":%d}}' % n)


def test_a_last_token_without_text_still_counts_after_a_stop_that_reads_on():
    """vLLM holds back a token that ends inside a UTF-8 character, so a stream's last chunk can carry its count
    (usage) and no text. Seen against real vLLM: a `none` stream stopped at 10 tokens read 40 and recorded 39,
    because the count in an empty chunk was taken only before Stop."""
    rec = StreamRecord(stack="requests", close_mode="none", endpoint="chat", request_id="r", stop_plan="tokens:1",
                       wall_start=time.time(), sent=time.monotonic())
    reader = StreamReader(rec, StopPlan(tokens=1), read_on=True)
    for line in (_chunk(b"a", 1), b"", _chunk(b"b", 2), b"", _finish(3), b""):
        assert not reader.feed(line, False)
    assert reader.feed(b"data: [DONE]", False) is False and reader.feed(b"", False) is True
    assert (rec.tokens_at_stop, rec.tokens, rec.usage_tokens, rec.finish_reason) == (1, 3, 3, "length")
