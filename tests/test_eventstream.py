"""What an upstream may send is bounded: lines and events past their caps end the stream with
`upstream_malformed`, decoding costs O(n) however the bytes are split, and the server stays
responsive while an upstream floods it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from tornado.httpclient import AsyncHTTPClient

from tornado_sse.demo import Script
from tornado_sse.errors import MalformedChunk
from tornado_sse.eventstream import MAX_EVENT_BYTES, MAX_LINE_BYTES, EventStreamDecoder

from .sseclient import ask

MiB = 1024 * 1024


def test_a_line_past_the_cap_raises_whether_it_arrives_whole_or_in_pieces() -> None:
    with pytest.raises(MalformedChunk, match="line over"):
        list(EventStreamDecoder().feed(b"data: " + b"x" * MAX_LINE_BYTES + b"\n\n"))
    decoder = EventStreamDecoder()
    with pytest.raises(MalformedChunk, match="line over"):
        for _ in range(4 * MiB // 65536):  # an endless line with no newline
            list(decoder.feed(b"x" * 65536))


def test_an_event_past_the_cap_raises_even_when_each_line_is_short() -> None:
    line = b"data: " + b"y" * 1000 + b"\n"
    decoder = EventStreamDecoder()
    with pytest.raises(MalformedChunk, match="event over"):
        for _ in range(MAX_EVENT_BYTES // 1000 + 1):  # no blank line: one ever-growing event
            list(decoder.feed(line))


def test_a_line_and_an_event_just_under_the_caps_are_decoded() -> None:
    data = b"z" * (MAX_LINE_BYTES - len(b"data: "))
    assert list(EventStreamDecoder().feed(b"data: " + data + b"\n\n")) == [data]
    # An event of many lines whose data, line breaks counted, is exactly the cap.
    full, rest = divmod(MAX_EVENT_BYTES, 1001)
    values = [b"y" * 1000] * full + [b"y" * (rest - 1)]
    event = b"".join(b"data: " + v + b"\n" for v in values) + b"\n"
    assert list(EventStreamDecoder().feed(event)) == [b"\n".join(values)]


def test_whole_events_in_their_own_reads_decode_as_byte_by_byte_reads_do() -> None:
    # Most reads are one whole `data: ` event, which takes a shorter path; around it, the state
    # it must not skip: an unfinished line, an unfinished event, a CR waiting for its LF.
    reads = [b"data: a\n\n", b"data: k\rdata: l\n\n", b"data: b\r", b"\ndata: c\n\n", b"data: d\n", b"data: e\n\n",
             b": comment\n\n", b"data:f\n\n", b"data: g", b"\n\n", b"data: h\n\ndata: i\n\n",
             b"event: x\ndata: j\n\n", b"data: [DONE]\n\n"]
    expected = [b"a", b"k\nl", b"b\nc", b"d\ne", b"f", b"g", b"h", b"i", b"j", b"[DONE]"]
    whole = EventStreamDecoder()
    assert [data for read in reads for data in whole.feed(read)] == expected
    single = EventStreamDecoder()
    wire = b"".join(reads)
    assert [data for i in range(len(wire)) for data in single.feed(wire[i:i + 1])] == expected


def test_a_long_line_in_small_reads_costs_linear_time() -> None:
    # Re-joining the unfinished line on every read copied ~16 GB here (seconds); once: milliseconds.
    decoder, piece = EventStreamDecoder(), b"w" * 32
    started = time.perf_counter()
    list(decoder.feed(b"data: "))
    for _ in range((MAX_LINE_BYTES - 64) // len(piece)):
        list(decoder.feed(piece))
    [event] = list(decoder.feed(b"\n\n"))
    took = time.perf_counter() - started
    assert len(event) == (MAX_LINE_BYTES - 64) // len(piece) * len(piece)
    assert took < 1.0, f"{took:.2f} s to decode one 1 MiB line in 32-byte reads"


@pytest.mark.gen_test(timeout=30)
async def test_an_endless_line_from_the_upstream_ends_the_stream_malformed_and_the_server_stays_responsive(
        base_url, fake):
    pieces = 64  # 4 MiB with no newline, then the script would end the stream normally
    flood: list[str | dict[str, object] | bytes] = [b'data: {"choices": [{"delta": {"content": "']
    fake.script = Script(deltas=flood + [b"x" * 65536] * pieces, token_delay=0.005)
    slowest = 0.0
    asking = asyncio.ensure_future(ask(base_url, "question=q", timeout=20))
    while not asking.done():
        started = time.monotonic()
        health = await AsyncHTTPClient().fetch(base_url + "/healthz", request_timeout=10)
        slowest = max(slowest, time.monotonic() - started)
        assert health.code == 200
        await asyncio.sleep(0.02)
    answer = await asking
    assert [json.loads(e)["code"] for e in answer.errors] == ["upstream_malformed"]
    assert answer.events[-1] == ("update", "<END_STREAMING_SSE>")
    # The server hung up past the cap (1 MiB: ~16 pieces), not after the whole flood.
    await asyncio.sleep(0.2)
    assert fake.completed == 0 and fake.disconnects and fake.disconnects[0].chunks_written < pieces // 2
    assert slowest < 0.75, f"/healthz took {slowest:.2f} s while the upstream flooded the server"
