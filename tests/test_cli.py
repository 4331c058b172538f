"""The command line: flags, validation, the demo backend end to end, and shutdown, as processes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tornado_sse.cli import parse_settings

from .sseclient import parse_events

FLAGS = ["--api", "--upstream-transport", "--log-format", "--log-content", "--public-metrics", "--host", "--port", "--model", "--temperature", "--max-tokens", "--backend",
         "--max-question-chars", "--log-level", "--connect-timeout", "--first-token-timeout",
         "--idle-timeout", "--max-retries", "--keepalive", "--send-timeout", "--max-streams",
         "--rate-limit", "--rate-burst", "--trust-proxy-headers", "--allowed-origins", "--access-token",
         "--certfile", "--keyfile", "--drain-timeout", "--resume-grace", "--resume-buffer",
         "--max-turns", "--max-conversation-chars", "--conversation-ttl", "--max-conversations",
         "--reasoning-effort", "--system-prompt", "--system-prompt-file",
         "--session-secret", "--session-max-age", "--pad-frames", "--store"]
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}


@pytest.mark.parametrize("command", [[sys.executable, "-m", "tornado_sse"], ["tornado-sse"]])
def test_help_lists_every_flag_with_its_default(command: list[str]) -> None:
    out = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True).stdout
    for flag in FLAGS:
        assert flag in out
    assert "default: 127.0.0.1" in out and "default: 8888" in out and "default: 1024" in out
    assert "OPENAI_API_KEY" in out and "OPENAI_BASE_URL" in out


@pytest.mark.parametrize(
    "args, words",
    [(["--temperature", "5"], "invalid --temperature: 5.0 (accepted: 0 to 2)"),
     (["--backend", "magic"], "invalid --backend: 'magic' (accepted: one of auto|openai|demo)"),
     (["--port", "99999"], "invalid --port"),
     (["--max-question-chars", "0"], "invalid --max-question-chars"),
     (["--port", "eighty"], "invalid int value: 'eighty'")],
)
def test_an_invalid_flag_stops_with_one_clear_line(args: list[str], words: str) -> None:
    run = subprocess.run([sys.executable, "-m", "tornado_sse", *args], capture_output=True, text=True)
    assert run.returncode == 2
    assert words in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "environ, backend",
    [({}, "demo"), ({"OPENAI_API_KEY": "sk-x"}, "openai"),
     ({"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"}, "openai"), ({"OPENAI_API_KEY": ""}, "demo")],
)
def test_auto_uses_a_real_upstream_only_when_one_is_configured(environ: dict[str, str], backend: str) -> None:
    assert parse_settings([], environ).resolved_backend == backend
    assert parse_settings(["--backend", "demo"], {"OPENAI_API_KEY": "sk-x"}).resolved_backend == "demo"


def test_api_responses_selects_the_responses_backend_in_demo_mode_too() -> None:
    with running("--api", "responses") as (_, port, _lines):
        events = parse_events(fetch(port, "/ask?question=Via%20Responses"))
    assert events[-1] == ("update", "<END_STREAMING_SSE>")
    assert "Via Responses" in "".join(d for e, d in events[1:-1])


def test_the_api_key_is_not_in_the_settings_repr() -> None:
    assert "sk-very-secret" not in repr(parse_settings([], {"OPENAI_API_KEY": "sk-very-secret"}))


@contextmanager
def running(*args: str, env: dict[str, str] | None = None, python: str = sys.executable,
            cwd: str | None = None) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """Start the server on a free port; yields the process, its port and its log lines so far."""
    proc = subprocess.Popen([python, "-m", "tornado_sse", "--port", "0", *args],
                            env=env or CLEAN_ENV, stderr=subprocess.PIPE, text=True, cwd=cwd)
    assert proc.stderr is not None
    lines: list[str] = []
    drain: threading.Thread | None = None
    try:
        while True:
            line = proc.stderr.readline()
            assert line, "server exited: " + "".join(lines)
            lines.append(line)
            if match := re.search(r"listening on https?://[\d.]+:(\d+)/", line):
                break
        # Keep reading the log, so a chatty server never blocks on a full pipe.
        stderr = proc.stderr
        drain = threading.Thread(target=lambda: lines.extend(stderr), daemon=True)
        drain.start()
        yield proc, int(match.group(1)), lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if drain is not None:
            drain.join(5)
        proc.stderr.close()


def fetch(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as response:
        return response.read()


def test_a_port_in_use_is_one_clear_line_not_a_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "tornado_sse", "--port", str(port)],
                             capture_output=True, text=True, env=CLEAN_ENV, timeout=20)
    assert run.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in run.stderr
    assert "Traceback" not in run.stderr


def test_with_no_key_the_demo_backend_streams_an_answer_that_mentions_the_question() -> None:
    with running() as (_, port, lines):
        assert any("backend: demo" in line for line in lines)
        events = parse_events(fetch(port, "/ask?question=What%20is%20tornado%3F"))
        text = "".join(data for event, data in events[1:-1])
        assert events[-1] == ("update", "<END_STREAMING_SSE>") and len(events) > 20
        assert "What is tornado?" in text and "demo backend" in text and "OPENAI_API_KEY" in text
        assert "\n" in text  # multi-line, markdown-ish
        assert b"Demo mode" in fetch(port, "/")
        assert json.loads(fetch(port, "/healthz")) == {"status": "ok", "backend": "demo", "model": "demo"}


def test_openai_base_url_points_the_server_at_another_upstream() -> None:
    upstream = subprocess.Popen([sys.executable, "-m", "tornado_sse.demo", "--port", "0", "--tokens", "5",
                                 "--first-token-delay", "0", "--token-delay", "0"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert upstream.stdout is not None
        base_url = re.search(r"(http://\S+/v1)", upstream.stdout.readline()).group(1)  # type: ignore[union-attr]
        env = {**CLEAN_ENV, "OPENAI_BASE_URL": base_url}
        with running("--model", "llama3.2", env=env) as (_, port, lines):
            assert any(f"backend: openai, model llama3.2 at {base_url} (chat API)" in line for line in lines)
            events = parse_events(fetch(port, "/ask?question=hi"))
            assert "".join(d for e, d in events[1:-2]) == "tok0 tok1 tok2 tok3 tok4 "
            assert events[-2] == ("finish", '{"reason": "stop", "usage": {"input_tokens": 1, "output_tokens": 5}}')
    finally:
        upstream.kill()
        upstream.wait()
        upstream.stdout.close()  # type: ignore[union-attr]


def dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response."""
    body, out = raw.split(b"\r\n\r\n", 1)[1], b""
    while body:
        size, body = body.split(b"\r\n", 1)
        if int(size, 16) == 0:
            break
        out, body = out + body[: int(size, 16)], body[int(size, 16) + 2:]
    return out
