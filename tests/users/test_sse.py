"""metrics.sse: WHATWG event-stream parsing, on every split of the input, through both decoders."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import NamedTuple

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stopstorm.users.sse import DONE, SSEDecoder, SSEEvent, SSELineDecoder, parse_sse_lines

E = SSEEvent
ZH = "你好\uff0c世界"  # "hello, world" with a full-width comma, as vLLM streams Chinese text


# --- feeders: the same stream through every entry point ---------------------------------------------------


def _decode_chunks(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.decode(chunk)
    return events + decoder.flush()


def _split_lines(stream: bytes) -> tuple[list[bytes], list[bytes]]:
    """(lines without terminators, lines with them), split at CRLF, LF and CR; a last partial line included."""
    pieces = re.split(rb"(\r\n|\r|\n)", stream)
    bare = pieces[0:-1:2]
    kept = [pieces[i] + pieces[i + 1] for i in range(0, len(pieces) - 1, 2)]
    if pieces[-1]:
        bare.append(pieces[-1])
        kept.append(pieces[-1])
    return bare, kept


def _feed_lines(lines: list[bytes] | list[str]) -> list[SSEEvent]:
    decoder = SSELineDecoder()
    events = [event for line in lines if (event := decoder.feed_line(line)) is not None]
    last = decoder.flush()
    return events if last is None else [*events, last]


def _feed_line_data(lines: list[bytes] | list[str]) -> list[str]:
    """The fast path's payloads (feed_line_data, then flush), as text."""
    decoder = SSELineDecoder()
    datas = [data for line in lines if (data := decoder.feed_line_data(line)) is not None]
    last = decoder.flush()
    if last is not None:
        datas.append(last.data)
    return [d.decode("utf-8", "replace") if isinstance(d, bytes) else d for d in datas]


FEEDERS: dict[str, Callable[[bytes], list[list[SSEEvent]]]] = {
    "decode_whole": lambda s: [_decode_chunks([s])],
    "decode_every_split": lambda s: [_decode_chunks([s[:i], s[i:]]) for i in range(len(s) + 1)],
    "decode_bytewise": lambda s: [_decode_chunks([s[i : i + 1] for i in range(len(s))])],
    "decode_bytewise_with_empty_chunks": lambda s: [
        _decode_chunks([piece for i in range(len(s)) for piece in (b"", s[i : i + 1])])
    ],
    "decode_per_event": lambda s: [_decode_chunks(re.split(rb"(?<=\n\n)|(?<=\r\r)|(?<=\r\n\r\n)", s))],
    "feed_line_bytes": lambda s: [_feed_lines(_split_lines(s)[0])],
    "feed_line_str": lambda s: [_feed_lines([line.decode("utf-8", "replace") for line in _split_lines(s)[0]])],
    "feed_line_with_terminators": lambda s: [_feed_lines(_split_lines(s)[1])],
    "parse_sse_lines": lambda s: [list(parse_sse_lines(_split_lines(s)[0]))],
}


# --- streams and the events they must give --------------------------------------------------------------


class Case(NamedTuple):
    name: str
    stream: bytes
    expected: list[SSEEvent]


def _chunk(**fields: object) -> bytes:
    base = {"id": "chatcmpl-b3f0a8c2e1d94f7a", "object": "chat.completion.chunk", "created": 1732456789}
    return orjson.dumps({**base, "model": "llm", **fields})


ROLE = _chunk(
    choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
)
CONTENT = [
    _chunk(choices=[{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
    for text in ("你好", "\uff0c世界", "! 🙂", " done")
]
FINISH = _chunk(
    choices=[{"index": 0, "delta": {"content": ""}, "logprobs": None, "finish_reason": "stop", "stop_reason": None}]
)
USAGE = _chunk(choices=[], usage={"prompt_tokens": 12, "total_tokens": 19, "completion_tokens": 7})
ERROR = (
    b'{"error": {"message": "max_tokens must be at least 1, got 0.", "type": "BadRequestError", '
    b'"param": null, "code": 400}}'
)
VLLM_CHAT = [ROLE, *CONTENT, FINISH, USAGE, DONE.encode()]
VLLM_COMPLETIONS = [
    b'{"id":"cmpl-5e1d","object":"text_completion","created":1732456789,"model":"llm","choices":[{"index":0,'
    b'"text":"' + text.encode() + b'","logprobs":null,"finish_reason":' + reason + b',"stop_reason":null}]}'
    for text, reason in (("Once", b"null"), (" upon", b"null"), (" a time", b'"length"'))
] + [DONE.encode()]


def _sse(payloads: list[bytes]) -> bytes:
    return b"".join(b"data: " + p + b"\n\n" for p in payloads)


def _events(payloads: list[bytes]) -> list[SSEEvent]:
    return [E(p.decode()) for p in payloads]


CASES = [
    Case("one_event", b'data: {"a": 1}\n\n', [E('{"a": 1}')]),
    Case("two_events", b"data: a\n\ndata: b\n\n", [E("a"), E("b")]),
    Case("crlf", b"data: a\r\n\r\ndata: b\r\n\r\n", [E("a"), E("b")]),
    Case("bare_cr", b"data: a\r\rdata: b\r\r", [E("a"), E("b")]),
    Case("mixed_endings", b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r\n", [E("a\nb\nc"), E("d")]),
    Case("comments_and_keepalives", b": ping\n\n:\ndata: x\n: in the middle\n\n: ping\r\n\r\n", [E("x")]),
    Case("data_without_space_and_with_two", b"data:x\n\ndata:  y\n\ndata: \n\n", [E("x"), E(" y"), E("")]),
    Case("multi_line_data", b"data: line1\ndata:line2\ndata:\n\n", [E("line1\nline2\n")]),
    Case("done", b'data: {"x": 1}\n\ndata: [DONE]\n\n', [E('{"x": 1}'), E(DONE)]),
    Case("last_event_without_blank_line", b"data: a\n\ndata: last\n", [E("a"), E("last")]),
    Case("last_event_without_any_line_end", b"data: a\n\ndata: b\ndata: last", [E("a"), E("b\nlast")]),
    Case("last_line_ends_with_cr", b"data: a\r\rdata: last\r", [E("a"), E("last")]),
    Case("bom", b"\xef\xbb\xbfdata: a\n\n", [E("a")]),
    Case("bom_only_at_start", b"\xef\xbb\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n", [E("a")]),
    Case("bom_then_blank_line", b"\xef\xbb\xbf\r\ndata: a\r\n\r\n", [E("a")]),
    Case("utf8", f"data: {ZH} 🙂 é\n\n".encode(), [E(f"{ZH} 🙂 é")]),
    Case("invalid_utf8_replaced", b"data: a\xff\xe4\xbdb\n\n", [E("a\ufffd\ufffdb")]),
    Case(
        "event_id_retry",
        b"event: update\nid: 42\nretry: 3000\ndata: x\n\ndata: y\n\nevent:\nid:\ndata: z\n\n",
        [E("x", "update", "42", 3000), E("y", None, "42", None), E("z", None, "", None)],
    ),
    Case(
        "retry_only_digits",
        b"retry: 12a\ndata: a\n\nretry: -1\ndata: b\n\nretry: \xef\xbc\x93\ndata: c\n\n"  # a full-width 3
        b"retry\ndata: d\n\nretry: 0\ndata: e\n\n",
        [E("a"), E("b"), E("c"), E("d"), E("e", retry=0)],
    ),
    Case("id_with_nul_ignored", b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n", [E("a", id="1"), E("b", id="1")]),
    Case(
        "event_without_data_not_dispatched",
        b"event: ping\nid: 7\nretry: 10\n\ndata: x\n\nevent: end\n\n",
        [E("x", None, "7", None)],
    ),
    Case("field_without_colon", b"data\n\ndata\ndata\n\nevent\ndata: x\n\n", [E(""), E("\n"), E("x")]),
    Case("unknown_fields", b"foo: bar\nDATA: no\ndata : no\ndata: x\n\n", [E("x")]),
    Case("colon_in_value", b"data: a: b:c\n\nevent: x:y\ndata: d\n\n", [E("a: b:c"), E("d", "x:y")]),
    Case("vllm_chat", b": keep-alive\n\n" + _sse(VLLM_CHAT), _events(VLLM_CHAT)),
    Case("vllm_chat_crlf", _sse(VLLM_CHAT).replace(b"\n", b"\r\n"), _events(VLLM_CHAT)),
    Case("vllm_completions", _sse(VLLM_COMPLETIONS), _events(VLLM_COMPLETIONS)),
    Case("vllm_error", _sse([ROLE, CONTENT[0], ERROR, DONE.encode()]), _events([ROLE, CONTENT[0], ERROR, b"[DONE]"])),
]


@pytest.mark.parametrize("feeder", FEEDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_entry_point_and_split_gives_the_expected_events(case: Case, feeder: str) -> None:
    for i, events in enumerate(FEEDERS[feeder](case.stream)):
        assert events == case.expected, f"{feeder} #{i}"  # for decode_every_split, i is the split offset


@pytest.mark.parametrize("form", ["bytes", "str", "with_terminators"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_feed_line_data_gives_the_same_payloads_as_the_full_rules(case: Case, form: str) -> None:
    bare, kept = _split_lines(case.stream)
    lines = {"bytes": bare, "str": [line.decode("utf-8", "replace") for line in bare], "with_terminators": kept}
    assert _feed_line_data(lines[form]) == [e.data for e in case.expected]


def test_feed_line_data_hands_a_one_line_payload_over_as_given() -> None:
    decoder = SSELineDecoder()
    assert decoder.feed_line_data(b": keep-alive") is None  # the first line takes the full rules (BOM)
    assert decoder.feed_line_data(b'data: {"a":1}') is None
    assert decoder.feed_line_data(b"") == b'{"a":1}'  # bytes, no decode
    assert decoder.feed_line_data("data: x") is None
    assert decoder.feed_line_data("") == "x"
    # A second data line joins the first by the full rules, and a plain feed_line after it sees both.
    assert decoder.feed_line_data(b"data: one") is None
    assert decoder.feed_line_data(b"data: two") is None
    assert decoder.feed_line_data(b"") == "one\ntwo"
    assert decoder.feed_line_data(b"data: three") is None
    assert decoder.feed_line(b"") == E("three")


def test_every_three_way_split() -> None:
    stream = b"\xef\xbb\xbfid: 1\r\n" + "data: 你好\r\rdata:  🙂\r\n\r\ndata: [DONE]".encode()
    expected = [E("你好", id="1"), E(" 🙂", id="1"), E(DONE, id="1")]
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            assert _decode_chunks([stream[:i], stream[i:j], stream[j:]]) == expected, (i, j)


# --- incremental behaviour ------------------------------------------------------------------------------


def test_events_come_out_as_soon_as_their_blank_line_arrives() -> None:
    decoder = SSEDecoder()
    assert decoder.decode(b"data: a\n") == []
    assert decoder.decode(b"\ndata: b\n\ndata: c") == [E("a"), E("b")]
    assert decoder.decode(b"\n") == []
    assert decoder.decode(b"\n") == [E("c")]
    assert decoder.flush() == []


def test_fields_apply_to_the_next_event_only() -> None:
    decoder = SSEDecoder()
    assert decoder.decode(b"event: e\nid: 1\nretry: 5\n") == []
    assert decoder.decode(b"data: a\n\n") == [E("a", "e", "1", 5)]
    assert decoder.decode(b"data: b\n\n") == [E("b", None, "1", None)]
    assert decoder.decode(b"event: f\n\ndata: c\n\n") == [E("c", None, "1", None)]


def test_last_event_without_blank_line_only_from_flush() -> None:
    decoder = SSEDecoder()
    assert decoder.decode(b"data: a\n\ndata: last") == [E("a")]
    assert decoder.decode(b"\n") == []
    assert decoder.flush() == [E("last")]
    assert decoder.flush() == []

    lines = SSELineDecoder()
    assert lines.feed_line(b"data: last") is None
    assert lines.flush() == E("last")
    assert lines.flush() is None


def test_cr_at_end_of_one_chunk_and_lf_at_start_of_next_are_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.decode(b"data: a\r") == []
    assert decoder.decode(b"") == []
    assert decoder.decode(b"\n") == []  # the LF of "data: a\r\n", not a blank line
    assert decoder.decode(b"\r") == [E("a")]
    assert decoder.decode(b"\ndata: b\r") == []  # again the LF of a CRLF
    assert decoder.decode(b"\r") == [E("b")]


def test_multibyte_character_split_across_chunks() -> None:
    payload = f"data: {ZH}🙂\n\n".encode()
    decoder = SSEDecoder()
    assert decoder.decode(payload[:7]) == []  # inside the first 3-byte character
    assert decoder.decode(payload[7:-5]) == []  # inside the 4-byte emoji
    assert decoder.decode(payload[-5:]) == [E(f"{ZH}🙂")]


def test_bom_split_across_chunks_and_flush_resets() -> None:
    decoder = SSEDecoder()
    for byte in (b"\xef", b"\xbb", b"\xbf"):
        assert decoder.decode(byte) == []
    assert decoder.decode(b"data: a\r\n\r\ndata: b\r") == [E("a")]
    assert decoder.flush() == [E("b")]
    # A fresh stream: the BOM is skipped again, a pending CR is forgotten, the last id too.
    assert decoder.decode(b"\xef\xbb\xbf\ndata: c\n\n") == [E("c")]


def test_line_decoder_accepts_str_and_bytes_and_strips_a_terminator() -> None:
    decoder = SSELineDecoder()
    assert decoder.feed_line("\ufeffevent: e") is None
    assert decoder.feed_line(b"data: \xe4\xbd\xa0\r\n") is None
    assert decoder.feed_line("data: b\r") is None
    assert decoder.feed_line("\n") == E("你\nb", "e")


# --- a realistic vLLM stream, read the way a client stack reads it --------------------------------------


def test_vllm_chat_stream_read_to_done() -> None:
    stream = b": keep-alive\n\n" + _sse(VLLM_CHAT) + b"data: after done is never read\n\n"
    decoder = SSEDecoder()
    content, finish, usage = [], None, None
    for i in range(0, len(stream), 97):  # odd-sized network reads
        for event in decoder.decode(stream[i : i + 97]):
            if event.data == DONE:
                break
            chunk = orjson.loads(event.data)
            for choice in chunk["choices"]:
                content.append(choice["delta"].get("content", ""))
                finish = choice["finish_reason"] or finish
            usage = chunk.get("usage") or usage
        else:
            continue
        break
    assert "".join(content) == f"{ZH}! 🙂 done"
    assert finish == "stop"
    assert usage == {"prompt_tokens": 12, "total_tokens": 19, "completion_tokens": 7}


def test_vllm_error_event() -> None:
    events = _decode_chunks([_sse([ROLE, ERROR, DONE.encode()])])
    error = orjson.loads(events[1].data)["error"]
    assert (error["type"], error["code"], error["param"]) == ("BadRequestError", 400, None)
    assert events[2].data == DONE


# --- property: random events, random line endings, random chunking --------------------------------------

_value = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
_field_event = st.tuples(  # data lines, event, id, retry
    st.lists(_value, min_size=1, max_size=3),
    st.none() | _value.filter(bool),
    st.none() | _value.filter(lambda v: "\0" not in v),
    st.none() | st.integers(0, 10**12),
)


@st.composite
def _streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent], list[int]]:
    raw = draw(st.lists(_field_event, max_size=6))
    lines: list[str] = []
    expected: list[SSEEvent] = []
    last_id = None
    for data, event, id_, retry in raw:
        if draw(st.booleans()):
            lines.append(": " + draw(_value))
        block = [f"data: {v}" if v.startswith(" ") or draw(st.booleans()) else f"data:{v}" for v in data]
        if event is not None:
            block.insert(draw(st.integers(0, len(block))), f"event: {event}")
        if id_ is not None:
            block.insert(draw(st.integers(0, len(block))), f"id: {id_}")
            last_id = id_
        if retry is not None:
            block.insert(draw(st.integers(0, len(block))), f"retry: {retry}")
        lines += [*block, ""]
        expected.append(E("\n".join(data), event, last_id, retry))
    if draw(st.booleans()) and lines:
        lines.pop()  # the last event lacks its blank line: flush() must still return it
    stream = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    previous = ""
    for i, line in enumerate(lines):
        eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        if previous == "\r" and not line and eol == "\n":
            eol = "\r\n"  # "\r" then "\n" would be one CRLF, not a line end and a blank line
        if i == len(lines) - 1 and draw(st.booleans()):
            eol = ""
        stream += (line + eol).encode()
        previous = eol
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    if draw(st.booleans()):  # also whole lines and whole events per chunk, as servers usually send them
        cuts = sorted({*cuts, *(m.end() for m in re.finditer(rb"\r\n|\r|\n", stream) if draw(st.booleans()))})
    return stream, expected, cuts


@settings(max_examples=300, deadline=None)
@given(_streams())
def test_random_streams_round_trip(case: tuple[bytes, list[SSEEvent], list[int]]) -> None:
    stream, expected, cuts = case
    bounds = [0, *cuts, len(stream)]
    assert _decode_chunks([stream[a:b] for a, b in itertools.pairwise(bounds)]) == expected
    assert _feed_lines(_split_lines(stream)[0]) == expected
    assert _feed_line_data(_split_lines(stream)[0]) == [e.data for e in expected]
