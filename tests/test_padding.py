"""Padding against the token-length side channel: the pure function byte for byte, then frame sizes
captured from a real stream, where the size no longer tells the token's length."""

from __future__ import annotations

import random
import statistics

import pytest

from tornado_sse import sse
from tornado_sse.cli import parse_settings
from tornado_sse.demo import FakeUpstream, Script
from tornado_sse.settings import Settings

from .browser import needs_chromium, open_page
from .conftest import with_settings
from .sseclient import ask, parse_events

FRAMES = [
    sse.encode_event("update", "a", "opg6h1TTwA6_WExb.2"),
    sse.encode_event("update", "x" * 20, "opg6h1TTwA6_WExb.123456"),
    sse.encode_event("update", "two\nlines\r\n", "s.9"),
    sse.encode_event("update", "caf\u00e9 \U0001f600", None),
    sse.encode_event("update", "y" * 300, "s.1"),  # past one bucket: the next one
    sse.encode_end("s.3"),
    sse.encode_error("upstream_timeout", "The model did not start answering.", "s.4"),
]


@pytest.mark.parametrize("frame", FRAMES)
@pytest.mark.parametrize("noise", range(sse.PAD_STEPS))
def test_a_padded_frame_is_the_frame_behind_one_comment_line_of_a_bucket_size(frame: bytes, noise: int) -> None:
    padded = sse.pad(frame, noise)
    comment, _, rest = padded.partition(b"\n")
    assert rest == frame and comment.startswith(b": ") and set(comment[2:]) <= {ord(".")}
    assert len(padded) % sse.PAD_BUCKET == noise * sse.PAD_STEP
    assert len(padded) - noise * sse.PAD_STEP - len(frame) in range(3, sse.PAD_BUCKET + 3)
    assert parse_events(padded) == parse_events(frame)  # what an EventSource dispatches


def test_padding_bytes_exactly() -> None:
    frame = b"event: update\ndata: hi\n\n"  # 24 bytes, + 3 for ": " and "\n" = 27
    assert sse.pad(frame, 0) == b": " + b"." * 101 + b"\n" + frame
    assert sse.pad(frame, 3) == b": " + b"." * 197 + b"\n" + frame
    big = b"data: " + b"z" * 130 + b"\n\n"  # 138 bytes: the 256 bucket
    assert sse.pad(big, 1) == b": " + b"." * (256 - 141 + 32) + b"\n" + big


def test_padding_is_on_unless_turned_off() -> None:
    assert Settings().pad_frames is True
    assert parse_settings([], {}).pad_frames is True
    assert parse_settings(["--no-pad-frames"], {}).pad_frames is False
    assert parse_settings([], {"TORNADO_SSE_PAD_FRAMES": "false"}).pad_frames is False


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return with_settings(settings, pad_frames=True)


def token_frames(body: bytes) -> list[tuple[int, int]]:
    """(the token's length in bytes, its frame's size with the padding) of each update frame."""
    pairs = []
    for block in body.split(b"\n\n")[:-1]:
        frame = block + b"\n\n"
        [(event, data)] = parse_events(frame)
        if event == "update" and data != sse.END_MARKER:
            pairs.append((len(data.encode()), len(frame)))
    return pairs


@pytest.mark.gen_test(timeout=30)
async def test_captured_frame_sizes_no_longer_tell_a_tokens_length(base_url, fake: FakeUpstream):
    rng = random.Random(7)
    tokens = [rng.choice("abcdefghij") * n for n in range(1, 21) for _ in range(40)]
    rng.shuffle(tokens)
    fake.script = Script(deltas=list[str | dict[str, object] | bytes](tokens))
    answer = await ask(base_url, "question=q")
    assert answer.text == "".join(tokens) and answer.events[-1] == ("update", sse.END_MARKER)
    pairs = token_frames(answer.body)
    seen: dict[int, set[int]] = {}
    for length, size in pairs:
        seen.setdefault(length, set()).add(size)
    assert sorted(seen) == list(range(1, 21))
    # Every length shows the very same sizes: one bucket, each of its random steps.
    assert all(sizes == seen[1] for sizes in seen.values()), seen
    assert len(seen[1]) == sse.PAD_STEPS
    r = statistics.correlation([float(a) for a, _ in pairs], [float(b) for _, b in pairs])
    assert abs(r) < 0.15, r  # unpadded, the size is the length plus a constant: r = 1


@pytest.mark.gen_test(timeout=40)
@needs_chromium
async def test_the_tutorials_event_source_client_reads_padded_frames_unchanged(base_url, request, fake):
    fake.script = Script(deltas=["Line one\n", "\n", "caf\u00e9 \U0001f600", " <b>x</b>", " end"])
    async with open_page(base_url, request) as (page, _):
        # The README's minimal client (the Laravel tutorial's), run in the page.
        text = await page.evaluate("""() => new Promise((resolve, reject) => {
            let answer = "";
            const source = new EventSource("/ask?question=" + encodeURIComponent("q"));
            source.addEventListener("update", (e) => {
                if (e.data === "<END_STREAMING_SSE>") { source.close(); resolve(answer); return; }
                answer += e.data;
            });
            source.addEventListener("error", () => { source.close(); reject(new Error("error")); });
        })""")
    assert text == "Line one\n\ncaf\u00e9 \U0001f600 <b>x</b> end"
