"""SSE clients nobody here wrote, against the real server: httpx-sse (Python), directly and behind
nginx's default HTTP/1.0 proxy_pass, and the `eventsource` package (Node) left open after the end.

httpx-sse once saw an empty event after every frame behind nginx (chunk-size lines inside an
HTTP/1.0 body); an EventSource that is never closed reconnects after the end frame, and before the
204 it got an error and the end frame again, every few seconds, for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import httpx_sse
import pytest

from tornado_sse.demo import FakeUpstream, Script, demo_reply

from .conftest import tuned
from .test_cli import running
from .test_deploy import nginx, tool

NODE_CLIENTS = Path(__file__).parent / "node"
END = "<END_STREAMING_SSE>"


def read_with_httpx_sse(url: str) -> list[tuple[str, str, str]]:
    """(event, data, id) of every event httpx-sse yields, until the end frame."""
    events: list[tuple[str, str, str]] = []
    with httpx.Client(timeout=30) as client, httpx_sse.connect_sse(client, "GET", url) as source:
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            events.append((sse.event, sse.data, sse.id))
            if sse.data == END:
                break
    return events


@pytest.mark.gen_test(timeout=30)
@tuned(pad_frames=True)  # the default: every frame carries a padding comment
async def test_httpx_sse_reads_exactly_the_events_sent(base_url, fake: FakeUpstream):
    fake.script = Script(deltas=["Hello", ",\n\nworld", " \u00e9\U0001f600"])
    events = await asyncio.get_running_loop().run_in_executor(
        None, read_with_httpx_sse, base_url + "/ask?question=q")
    stream = json.loads(events[0][1])["stream"]
    assert [(e, d) for e, d, _ in events[1:]] == [
        ("update", "Hello"), ("update", ",\n\nworld"), ("update", " \u00e9\U0001f600"),
        ("finish", '{"reason": "stop", "usage": {"input_tokens": 1, "output_tokens": 3}}'), ("update", END)]
    assert [i for _, _, i in events] == [f"{stream}.{n}" for n in range(1, 7)]


def test_httpx_sse_behind_nginxs_default_http_1_0_proxy_pass_sees_no_empty_events(tmp_path: Path) -> None:
    tool("nginx")
    with running("--backend", "demo", "--rate-limit", "0") as (_, server, _):
        minimal = f"server {{\n    listen 80;\n    location / {{ proxy_pass http://127.0.0.1:{server}; }}\n}}\n"
        with nginx(tmp_path, minimal) as port:
            events = read_with_httpx_sse(f"http://127.0.0.1:{port}/ask?question=hi")
    assert [e for e, _, _ in events] == ["meta"] + ["update"] * (len(events) - 3) + ["finish", "update"]
    assert "".join(d for e, d, _ in events[1:-2]) == "".join(demo_reply("hi"))
    assert all(d for _, d, _ in events) and events[-1][1] == END


@pytest.mark.gen_test(timeout=30)
@pytest.mark.skipif(not (NODE_CLIENTS / "node_modules").is_dir() and not os.environ.get("CI"),
                    reason="npm ci --prefix tests/node installs the Node clients (.ci/run does)")
async def test_nodes_eventsource_left_open_stops_at_the_204_and_never_asks_again(
        base_url, fake: FakeUpstream, caplog: pytest.LogCaptureFixture):
    # Its reconnection delay is 3 s (eventsource 3.x's default, no `retry:` field is sent): within
    # 7 s a client that got an error and the end frame again would have come back twice.
    caplog.set_level(logging.INFO, "tornado_sse.access")
    fake.script = Script(deltas=["Hello", " world"])
    node = shutil.which("node")
    assert node, "node is not installed (.ci/run installs it)"
    follow = await asyncio.create_subprocess_exec(
        node, str(NODE_CLIENTS / "follow.mjs"), base_url + "/ask?question=q", "7",
        stdout=subprocess.PIPE, cwd=NODE_CLIENTS)
    out, _ = await asyncio.wait_for(follow.communicate(), 20)
    seen = [json.loads(line) for line in out.decode().splitlines()]
    assert [e["type"] for e in seen] == ["open", "meta", "update", "update", "finish", "update",
                                         "connection-error", "connection-error", "done"]
    assert [e["data"] for e in seen if e["type"] == "update"] == ["Hello", " world", END]
    reconnecting, refused, done = seen[-3:]
    assert reconnecting["readyState"] == 0  # CONNECTING: it comes back by itself, as specified
    assert refused == {"type": "connection-error", "readyState": 2, "code": 204}  # CLOSED for good
    assert done["readyState"] == 2
    asks = [r.getMessage() for r in caplog.records if " GET /ask " in r.getMessage()]
    assert [a.split()[0] for a in asks] == ["200", "204"]
    assert len(fake.requests) == 1
