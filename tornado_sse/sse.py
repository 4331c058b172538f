"""The Server-Sent Events wire format: an event in, the exact bytes out. Pure functions only."""

from __future__ import annotations

import json
import re

END_MARKER = "<END_STREAMING_SSE>"
PING = b": ping\n\n"  # a comment line: keeps proxies and browsers from timing out, shows nothing

# Padding against the token-length side channel (Weiss et al., "What Was Your Prompt?", USENIX
# Security 2024; Whisper Leak, 2025): over TLS each frame is one record, so an unpadded frame's
# size gives its token's length away. A padded frame is a comment line in front, making its size
# the next multiple of PAD_BUCKET plus PAD_STEP times a random 0..PAD_STEPS-1 (the way OpenAI's
# `obfuscation` field normalizes its own events). Any delta up to ~70 bytes then has the same
# four possible sizes; longer ones show only which 128-byte bucket they fall in.
PAD_BUCKET = 128
PAD_STEP = 32
PAD_STEPS = 4
# Every comment line pad() can need, built once: the per-token path is one lookup and one join.
_PAD_LINES = tuple(b": " + b"." * n + b"\n" for n in range(PAD_BUCKET + PAD_STEP * PAD_STEPS))

# The spec ends a line at CRLF, CR or LF, and nowhere else (str.splitlines() would also split on
# U+2028, U+0085 and friends, and drop a trailing newline).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode_event(event: str, data: str, id: str | None = None) -> bytes:
    """One frame: `id: <id>` if given, `event: <event>`, one `data: ` line per line of `data`, a
    blank line.

    A browser joins the data lines with "\\n", so any text, newlines included, arrives as
    `event.data` unchanged (CRLF and CR arrive as LF: the format cannot carry them).
    """
    head = "id: " + id + "\nevent: " if id is not None else "event: "
    if "\n" in data or "\r" in data:  # most tokens have no line break: no regex (0.5 -> 0.3 us)
        data = "\ndata: ".join(_LINE_BREAK.split(data))
    return (head + event + "\ndata: " + data + "\n\n").encode()


def pad(frame: bytes, noise: int) -> bytes:
    """`frame` behind a `: ....` comment line (which EventSource ignores) that brings its length
    to the next multiple of PAD_BUCKET, plus `noise` (0 <= noise < PAD_STEPS) times PAD_STEP.
    The caller draws `noise` at random, so this stays a pure function."""
    filler = -(len(frame) + 3) % PAD_BUCKET + noise * PAD_STEP  # 3: the line's ": " and "\n"
    return _PAD_LINES[filler] + frame


def update_parts(text: str) -> tuple[str, ...]:
    """A text delta as the `update` frames to send.

    The reference page stops at an `update` whose data is exactly the end marker, so a model that
    writes the marker itself gets it split over two frames: same text, no early stop.
    """
    if text == END_MARKER:
        return END_MARKER[:9], END_MARKER[9:]
    return (text,)


def encode_error(code: str, message: str, id: str | None = None) -> bytes:
    return encode_event("error", json.dumps({"code": code, "message": message}), id)


def encode_end(id: str | None = None) -> bytes:
    return encode_event("update", END_MARKER, id)


def parse_event_id(value: str) -> tuple[str, int] | None:
    """`<stream>.<seq>` -> (stream, seq); anything else (a browser may send junk) -> None."""
    stream, dot, seq = value.strip().rpartition(".")
    if not dot or not stream or not (seq.isascii() and seq.isdigit()) or len(seq) > 9 or len(stream) > 64:
        return None
    return stream, int(seq)
