"""--log-format json: control and bidi characters from questions and answers never reach the log
raw; they are written as \\uXXXX escapes, which JSON decodes back to the same text."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest

from tornado_sse.logs import JSONFormatter

from .test_cli import running

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


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_access_log_escapes_a_c1_control_in_the_path(log_format: str) -> None:
    # Tornado refuses C0 controls in the request line, but reads its bytes as Latin-1: a raw 0x9B
    # arrives as U+009B, a one-byte CSI to a terminal showing the log.
    with running("--log-format", log_format) as (_, port, lines):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /\x9b31mred HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 404 ")
        deadline = time.monotonic() + 10
        while not any("31mred" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
    [line] = [line for line in lines if "31mred" in line]
    assert "\u009b" not in line and "/\\u009b31mred" in line
