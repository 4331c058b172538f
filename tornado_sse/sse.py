"""The Server-Sent Events wire format: an event in, the exact bytes out. Pure functions only."""

from __future__ import annotations

import json
import re

END_MARKER = "<END_STREAMING_SSE>"

# The spec ends a line at CRLF, CR or LF, and nowhere else (str.splitlines() would also split on
# U+2028, U+0085 and friends, and drop a trailing newline).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode_event(event: str, data: str) -> bytes:
    """One frame: `event: <event>`, one `data: ` line per line of `data`, a blank line.

    A browser joins the data lines with "\\n", so any text, newlines included, arrives as
    `event.data` unchanged (CRLF and CR arrive as LF: the format cannot carry them).
    """
    lines = _LINE_BREAK.split(data)
    return ("event: " + event + "\ndata: " + "\ndata: ".join(lines) + "\n\n").encode()


def encode_update(text: str) -> bytes:
    """A text delta as `update` frames.

    The reference page stops at an `update` whose data is exactly the end marker, so a model that
    writes the marker itself gets it split over two frames: same text, no early stop.
    """
    if text == END_MARKER:
        half = len(END_MARKER) // 2
        return encode_event("update", text[:half]) + encode_event("update", text[half:])
    return encode_event("update", text)


def encode_error(code: str, message: str) -> bytes:
    return encode_event("error", json.dumps({"code": code, "message": message}))


END_FRAME = encode_event("update", END_MARKER)
