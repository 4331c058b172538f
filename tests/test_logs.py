"""--log-format json: control and bidi characters from questions and answers never reach the log
raw; they are written as \\uXXXX escapes, which JSON decodes back to the same text."""

from __future__ import annotations

import json
import logging

import pytest

from tornado_sse.logs import JSONFormatter

TRICKY = [
    ("\u009b31m", "\\u009b31m"),  # a one-byte CSI: an escape sequence in a terminal
    ("\x1b[2J", "\\u001b[2J"),  # C0, escaped by json itself
    ("a\x7fb", "a\\u007fb"),
    ("\u0085next", "\\u0085next"),
    ("line\u2028sep\u2029par", "line\\u2028sep\\u2029par"),
    ("abc\u202edcba\u202c", "abc\\u202edcba\\u202c"),  # "Trojan Source" reordering
    ("\u2066\u2067\u2068\u2069\u202a\u202b\u202d", "\\u2066\\u2067\\u2068\\u2069\\u202a\\u202b\\u202d"),
    ("\u200e\u200f\u061c", "\\u200e\\u200f\\u061c"),
    ("caf\u00e9 \U0001F600 \u4e2d", "caf\u00e9 \U0001F600 \u4e2d"),  # printable text stays as it is
]


@pytest.mark.parametrize("raw, written", TRICKY)
def test_json_logs_escape_controls_and_bidi_characters_byte_exact(raw: str, written: str) -> None:
    record = logging.LogRecord("tornado_sse.stream", logging.INFO, __file__, 1, "stream done", None, None)
    record.created, record.msecs = 0.0, 0.0
    record.question = raw
    line = JSONFormatter().format(record)
    assert line.encode() == (
        '{"time": "1970-01-01T00:00:00.000Z", "level": "info", "logger": "tornado_sse.stream", '
        f'"message": "stream done", "question": "{written}"}}').encode()
    assert json.loads(line)["question"] == raw
