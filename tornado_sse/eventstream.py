"""The upstream's `text/event-stream` body -> each event's data, incrementally and bounded.

Lines end at CRLF, CR or LF (WHATWG HTML, 9.2.6), also when a CRLF is split between two reads.
Fields other than `data` (`event`, `id`, `retry`) and comments are not needed by the backends.

An upstream is not trusted to be sane: a line or an event past its cap raises `MalformedChunk`
(the reader gets `upstream_malformed`) instead of growing memory without bound, and every byte is
copied a bounded number of times, so feeding N bytes costs O(N) however they are split.
"""

from __future__ import annotations

from collections.abc import Iterator

from .errors import MalformedChunk

# Far above any real chunk (a Chat Completions chunk is a few hundred bytes, a Responses event with
# a whole output a few kB), far below what would hurt one process holding thousands of streams.
MAX_LINE_BYTES = 1024 * 1024
MAX_EVENT_BYTES = 1024 * 1024


class EventStreamDecoder:
    def __init__(self) -> None:
        self._pieces: list[bytes] = []  # the unfinished line, as it arrived: joined once, at its end
        self._pending = 0  # its length
        self._data: list[bytes] = []  # the current event's data lines
        self._size = 0  # their length
        self._skip_lf = False  # the last read ended in CR: a LF starting the next one is its pair

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        # The usual read: one whole event of one `data: ` line (a Chat Completions chunk), nothing
        # pending. Its data as is, without splitting it into lines (about 1 us a token).
        if (not self._pieces and not self._data and not self._skip_lf
                and chunk.startswith(b"data: ") and chunk.find(b"\n") == len(chunk) - 2
                and chunk.endswith(b"\n\n") and b"\r" not in chunk and len(chunk) <= MAX_LINE_BYTES):
            yield chunk[6:-2]
            return
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if not chunk:
            return
        self._skip_lf = chunk.endswith(b"\r")
        if b"\r" in chunk:  # a CR never waits in the unfinished line: no pair is split across it
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in chunk:
            self._pieces.append(chunk)
            self._pending += len(chunk)
            if self._pending > MAX_LINE_BYTES:
                raise MalformedChunk(f"the upstream sent a line over {MAX_LINE_BYTES} bytes long")
            return
        *lines, tail = chunk.split(b"\n")
        if self._pieces:
            self._pieces.append(lines[0])
            lines[0] = b"".join(self._pieces)
        self._pieces = [tail] if tail else []
        self._pending = len(tail)
        for line in lines:
            if len(line) > MAX_LINE_BYTES:
                raise MalformedChunk(f"the upstream sent a line over {MAX_LINE_BYTES} bytes long")
            if not line:
                if self._data:
                    data = b"\n".join(self._data)
                    self._data, self._size = [], 0
                    yield data
            elif line.startswith(b"data:"):
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                self._size += len(value) + 1
                if self._size > MAX_EVENT_BYTES:
                    raise MalformedChunk(f"the upstream sent an event over {MAX_EVENT_BYTES} bytes long")
                self._data.append(value)
        if self._pending > MAX_LINE_BYTES:
            raise MalformedChunk(f"the upstream sent a line over {MAX_LINE_BYTES} bytes long")
