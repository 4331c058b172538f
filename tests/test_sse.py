"""The wire format, byte for byte, and the upstream decoder that reads it back."""

from __future__ import annotations

import pytest

from tornado_sse import sse
from tornado_sse.backend import EventStreamDecoder, Usage, chunk_ending, parse_chat_chunk
from tornado_sse.errors import ErrorInStream, MalformedChunk

from .sseclient import parse_events


@pytest.mark.parametrize(
    "data, frame",
    [
        ("hello", b"event: update\ndata: hello\n\n"),
        ("a\nb", b"event: update\ndata: a\ndata: b\n\n"),
        ("\n\n", b"event: update\ndata: \ndata: \ndata: \n\n"),
        ("x\n", b"event: update\ndata: x\ndata: \n\n"),
        ("\r\n", b"event: update\ndata: \ndata: \n\n"),
        ("a\rb", b"event: update\ndata: a\ndata: b\n\n"),
        ("a\r\n\nb", b"event: update\ndata: a\ndata: \ndata: b\n\n"),
        (" lead", b"event: update\ndata:  lead\n\n"),
        ("data: x", b"event: update\ndata: data: x\n\n"),
        (":x", b"event: update\ndata: :x\n\n"),
        ("event: y\n\n", b"event: update\ndata: event: y\ndata: \ndata: \n\n"),
        ("h\u00e9 \u4f60\u597d \U0001f600", "event: update\ndata: h\u00e9 \u4f60\u597d \U0001f600\n\n".encode()),
        # Not line breaks in SSE, so they stay inside the data line (str.splitlines would split).
        ("a\u2028b\x85c\x0bd", "event: update\ndata: a\u2028b\x85c\x0bd\n\n".encode()),
    ],
)
def test_encode_event_is_byte_exact(data: str, frame: bytes) -> None:
    assert sse.encode_event("update", data) == frame


def test_a_frame_carries_its_id_first() -> None:
    assert sse.encode_event("update", "a\nb", "s1.7") == b"id: s1.7\nevent: update\ndata: a\ndata: b\n\n"
    assert parse_events(sse.encode_event("meta", "{}", "s1.1")) == [("meta", "{}")]


@pytest.mark.parametrize("data", ["a\nb", "\n\n", "x\n", "\n", "data: x", ":x", "event: y", "\u2028", " ", "a\n\nb\n"])
def test_a_browser_reads_back_the_same_text(data: str) -> None:
    assert parse_events(sse.encode_event("update", data)) == [("update", data)]


@pytest.mark.parametrize("data, seen", [("\r\n", "\n"), ("a\rb", "a\nb"), ("x\r\n\r\n", "x\n\n")])
def test_carriage_returns_arrive_as_line_feeds(data: str, seen: str) -> None:
    # SSE has no way to carry a CR inside data: the spec turns every line end into LF.
    assert parse_events(sse.encode_event("update", data)) == [("update", seen)]


def test_end_frame_is_the_reference_protocols() -> None:
    assert sse.encode_end() == b"event: update\ndata: <END_STREAMING_SSE>\n\n"
    assert sse.encode_end("s.9") == b"id: s.9\nevent: update\ndata: <END_STREAMING_SSE>\n\n"


def test_a_delta_equal_to_the_end_marker_is_split_so_it_cannot_end_the_stream() -> None:
    assert sse.update_parts("<END_STREAMING_SSE>") == ("<END_STRE", "AMING_SSE>")
    assert sse.update_parts("<END_STREAMING_SSE> ") == ("<END_STREAMING_SSE> ",)
    assert sse.update_parts("x") == ("x",)


def test_the_keepalive_is_a_comment_a_browser_ignores() -> None:
    assert sse.PING == b": ping\n\n"
    assert parse_events(sse.PING + sse.encode_event("update", "x") + sse.PING) == [("update", "x")]


@pytest.mark.parametrize("value, parsed", [
    ("abc.3", ("abc", 3)), ("a.b.12", ("a.b", 12)), (" abc.0 ", ("abc", 0)),
    ("abc", None), (".3", None), ("abc.", None), ("abc.-1", None), ("abc.\u00b2", None),
    ("abc.1e3", None), ("x" * 65 + ".1", None), ("abc.1234567890", None), ("", None),
])
def test_last_event_ids_from_browsers_are_parsed_strictly(value: str, parsed: tuple[str, int] | None) -> None:
    assert sse.parse_event_id(value) == parsed


def test_error_frame_carries_json_code_and_message() -> None:
    assert sse.encode_error("upstream_timeout", 'Too "slow"\nreally') == (
        b'event: error\ndata: {"code": "upstream_timeout", "message": "Too \\"slow\\"\\nreally"}\n\n'
    )


def _decode_all(body: bytes, cut: list[int]) -> list[bytes]:
    decoder, out, start = EventStreamDecoder(), list[bytes](), 0
    for end in [*cut, len(body)]:
        out.extend(decoder.feed(body[start:end]))
        start = end
    return out


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_upstream_decoder_handles_every_line_ending_and_every_split(newline: bytes) -> None:
    body = (b'data: {"a": 1}' + newline + newline + b": comment" + newline
            + b"event: x" + newline + b"data:two" + newline + b"data: lines" + newline + newline
            + b"data: [DONE]" + newline + newline)
    expected = [b'{"a": 1}', b"two\nlines", b"[DONE]"]
    assert _decode_all(body, []) == expected
    for i in range(1, len(body)):  # every place a TCP read could end, CRLF halves included
        for j in range(i, len(body)):  # and every second cut, down to one-byte reads
            assert _decode_all(body, [i, j]) == expected, (i, j)


@pytest.mark.parametrize(
    "chunk, parsed",
    [
        (b'{"choices": [{"delta": {"content": "hi"}}]}', ("hi", None)),
        (b'{"choices": []}', (None, None)),
        (b'{"choices": [], "usage": {"total_tokens": 3}}', (None, None)),
        (b'{"choices": [{"delta": {"content": null}}]}', (None, None)),
        (b'{"choices": [{"delta": {}, "finish_reason": "stop"}]}', (None, None)),
        (b'{"choices": [{"delta": null}]}', (None, None)),
        (b'{"choices": [{"delta": {"role": "assistant"}}]}', (None, None)),
        (b'{"choices": [{"delta": {"reasoning_content": "hm"}}]}', (None, "hm")),
        (b'{"choices": [{"delta": {"reasoning": "hm", "content": "x"}}]}', ("x", "hm")),
        (b'{"prompt_filter_results": [], "choices": []}', (None, None)),
        (b'{"error": null, "choices": [{"delta": {"content": "ok"}}]}', ("ok", None)),
    ],
)
def test_chunk_shapes_real_servers_send(chunk: bytes, parsed: tuple[str | None, str | None]) -> None:
    assert parse_chat_chunk(chunk)[:2] == parsed


@pytest.mark.parametrize(
    "chunks, ending",
    [
        # OpenAI: the finish chunk, then (stream_options.include_usage) the usage chunk
        ([b'{"choices": [{"delta": {}, "finish_reason": "length"}], "usage": null}',
          b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}}'],
         ("length", Usage(3, 7))),
        # vLLM and others: the usage on the finish chunk itself
        ([b'{"choices": [{"delta": {"content": "x"}, "finish_reason": "content_filter"}], '
          b'"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}'],
         ("content_filter", Usage(1, 2))),
        ([b'{"choices": [{"delta": {"content": "x"}, "finish_reason": null}]}'], (None, None)),
        ([b'{"choices": [], "usage": {"total_tokens": 3}}'], (None, None)),
        ([b'{"choices": [{"delta": {}, "finish_reason": "stop"}]}', b'{"choices": [], "usage": null}'],
         ("stop", None)),
    ],
)
def test_the_finish_reason_and_usage_come_from_the_last_chunks(
        chunks: list[bytes], ending: tuple[str | None, Usage | None]) -> None:
    reason: str | None = None
    usage: Usage | None = None
    for chunk in chunks:
        tail = parse_chat_chunk(chunk)[2]
        if tail is not None:
            reason, usage = chunk_ending(tail, reason, usage)
    assert (reason, usage) == ending


@pytest.mark.parametrize(
    "chunk",
    [b"{not json", b"[1, 2]", b'"text"', b'{"choices": [1]}', b'{"choices": {"a": 1}}',
     b'{"choices": [{"delta": {"content": 5}}]}', b'{"choices": [{"delta": "x"}]}'],
)
def test_malformed_chunks_raise_a_typed_error(chunk: bytes) -> None:
    with pytest.raises(MalformedChunk):
        parse_chat_chunk(chunk)


def test_an_error_object_in_the_stream_raises() -> None:
    with pytest.raises(ErrorInStream):
        parse_chat_chunk(b'{"error": {"message": "boom", "type": "server_error"}}')
