"""Signals, as processes: SIGTERM drains, SIGHUP drains like it, and a second signal ends the drain
at once, every open stream still ending with its end frame."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest

from .sseclient import parse_events
from .test_cli import dechunk, running

END = ("update", "<END_STREAMING_SSE>")


def stream_across(signals: list[signal.Signals], *args: str, gap: float = 0.3
                  ) -> tuple[int, list[tuple[str, str]], float, list[str]]:
    """Open a stream, send `signals` (`gap` apart) after its first token; the exit code, the
    events the client got, seconds from the first signal to the exit, and the log."""
    with running(*args) as (proc, port, lines):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /ask?question=q HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"event: update" not in received:
            received += sock.recv(65536)
        signalled = time.monotonic()
        for number in signals:
            proc.send_signal(number)
            time.sleep(gap)
        sock.settimeout(20)
        while not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        sock.close()
        code = proc.wait(timeout=20)
        took = time.monotonic() - signalled
        time.sleep(0.2)  # the log reader catches up
        return code, parse_events(dechunk(received)), took, list(lines)


def test_sigterm_ends_open_streams_with_an_error_and_the_end_frame_then_exits_0() -> None:
    code, events, took, _ = stream_across([signal.SIGTERM], "--drain-timeout", "0.3")
    assert code == 0 and took < 3
    assert events[-1] == END
    assert events[-2][0] == "error" and json.loads(events[-2][1])["code"] == "server_shutdown"
    assert "restarting" in json.loads(events[-2][1])["message"]


def test_sigterm_lets_open_streams_finish_within_the_drain_timeout() -> None:
    code, events, _, _ = stream_across([signal.SIGTERM], "--drain-timeout", "20")
    assert code == 0
    assert events[-1] == END and not [e for e in events if e[0] == "error"]
    assert "connect a real model" in "".join(d for e, d in events if e == "update")


def test_sighup_drains_like_sigterm() -> None:
    code, events, _, log = stream_across([signal.SIGHUP], "--drain-timeout", "20")
    assert code == 0
    assert events[-1] == END and not [e for e in events if e[0] == "error"]
    assert "connect a real model" in "".join(d for e, d in events if e == "update")  # all of it
    assert any("SIGHUP: shutting down" in line for line in log)


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT),
                                           (signal.SIGTERM, signal.SIGHUP)])
def test_a_second_signal_ends_the_drain_at_once_with_the_end_frame_and_exit_1(first, second) -> None:
    # The demo answer takes seconds; the drain would let it finish for a minute.
    code, events, took, log = stream_across([first, second], "--drain-timeout", "60", gap=0.3)
    assert code == 1 and took < 3.5
    assert events[-1] == END
    assert events[-2][0] == "error" and json.loads(events[-2][1])["code"] == "server_shutdown"
    assert any(f"{second.name} during the drain: ending the open streams now" in line for line in log)
