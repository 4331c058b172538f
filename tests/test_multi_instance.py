"""Three real server processes sharing a real redis-server, behind a real nginx running
deploy/nginx-multi.conf (round-robin, no affinity), in front of the fake upstream (in a thread of
this process, so the test reads its requests and disconnect times): follow-ups, a resume and a
Stop on other instances; SIGTERM and kill -9 of an instance; Redis killed and brought back."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tornado_sse.conversations import CUT_OFF_NOTE
from tornado_sse.demo import FakeUpstream, Script

from .conftest import API_KEY, OWNER
from .redisserver import RedisServer, redis_server
from .sseclient import next_frame
from .test_cli import CLEAN_ENV, running
from .test_deploy import DEPLOY, nginx, tool

SECRET = "Zq7xV2mK9pL4wR8tN3bY6cH1"
SERVER = ("--backend", "openai", "--model", "test-model", "--rate-limit", "0", "--max-retries", "0",
          "--trust-proxy-headers", "--resume-grace", "30", "--no-pad-frames", "--keepalive", "1")
END = ("update", "<END_STREAMING_SSE>")


@contextmanager
def upstream_thread() -> Iterator[tuple[FakeUpstream, int]]:
    """The fake upstream on its own loop in a thread: its requests and disconnects are readable
    here, with time.monotonic() stamps comparable to this process's."""
    fake = FakeUpstream()
    started = threading.Event()
    state: dict[str, object] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def main() -> None:
            server, port = fake.listen()
            done = asyncio.Event()
            state.update(port=port, loop=loop, done=done)
            started.set()
            await done.wait()
            server.stop()

        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield fake, int(state["port"])  # type: ignore[call-overload]
    finally:
        loop = state["loop"]
        loop.call_soon_threadsafe(state["done"].set)  # type: ignore[attr-defined]
        thread.join(10)


@dataclass
class Cluster:
    nginx: int
    instances: list[tuple[subprocess.Popen[str], int, list[str]]]
    fake: FakeUpstream
    redis: RedisServer

    def port_of(self, served_by: str) -> int:
        return int(served_by.rsplit(":", 1)[1])

    def process(self, served_by: str) -> subprocess.Popen[str]:
        return next(p for p, port, _ in self.instances if port == self.port_of(served_by))


@contextmanager
def cluster(tmp_path: Path, *extra: str) -> Iterator[Cluster]:
    tool("nginx")
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server())
        fake, upstream = stack.enter_context(upstream_thread())
        env = {**CLEAN_ENV, "OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream}/v1",
               "TORNADO_SSE_STORE": redis.url, "TORNADO_SSE_SESSION_SECRET": SECRET}
        instances = [stack.enter_context(running(*SERVER, *extra, env=env)) for _ in range(3)]
        site = (DEPLOY / "nginx-multi.conf").read_text()
        for sample, (_, port, _) in zip(("8001", "8002", "8003"), instances):
            site = site.replace(f"127.0.0.1:{sample};", f"127.0.0.1:{port};")
        # The test alone asks nginx which instance answered: the sample needs no such header.
        site = site.replace("proxy_pass http://tornado_sse;\n",
                            "proxy_pass http://tornado_sse;\n        add_header X-Served-By $upstream_addr always;\n")
        yield Cluster(stack.enter_context(nginx(tmp_path, site)), instances, fake, redis)


class Reader:
    """One /ask (or resume) through nginx, read frame by frame: (id, event, data)."""

    def __init__(self, port: int, query: dict[str, str], headers: dict[str, str] | None = None):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.request("GET", "/ask?" + urlencode(query), headers={**OWNER, **(headers or {})})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.served_by = self.response.getheader("X-Served-By") or ""
        # A stream that never ends still pings (--keepalive 1): fail, rather than hang, past this.
        self.deadline = time.monotonic() + 40

    def frame(self) -> tuple[str, str, str]:
        return next_frame(self.response, self.deadline)

    def until_end(self) -> list[tuple[str, str, str]]:
        frames = [self.frame()]
        while frames[-1][1:] != END:
            frames.append(self.frame())
        return frames

    def close(self) -> None:
        self.conn.close()


def post_stop(port: int, stream: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", "/stop?" + urlencode({"stream": stream}), headers=OWNER)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("X-Served-By") or ""
    finally:
        conn.close()


def get_json(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def eventually(check, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def texts(frames: list[tuple[str, str, str]]) -> str:
    return "".join(d for _, e, d in frames if e == "update" and d != END[1])


def consecutive(frames: list[tuple[str, str, str]], stream: str, after: int) -> bool:
    return [i for i, _, _ in frames] == [f"{stream}.{n}" for n in range(after + 1, after + 1 + len(frames))]


def test_follow_ups_keep_their_context_on_whichever_instance_round_robin_picks(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.fake.script = Script(deltas=["An ", "answer."])
        first = Reader(c.nginx, {"question": "q0"})
        meta = json.loads(first.frame()[2])
        first.until_end()
        first.close()
        served = {first.served_by}
        for i in range(1, 6):
            reader = Reader(c.nginx, {"question": f"q{i}", "conversation": str(meta["conversation"])})
            follow = json.loads(reader.frame()[2])
            reader.until_end()
            reader.close()
            served.add(reader.served_by)
            assert follow["restarted"] is False and follow["conversation"] == meta["conversation"]
            history = c.fake.requests[i]["messages"]
            assert [m["content"] for m in history] == [
                text for n in range(i) for text in (f"q{n}", "An answer.")] + [f"q{i}"]
        assert len(served) == 3  # every instance answered a part of the one conversation


def test_a_resume_on_another_instance_gets_the_exact_text_with_one_upstream_request(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.fake.script = Script(tokens=40, token_delay=0.03)
        reader = Reader(c.nginx, {"question": "q"})
        frames = [reader.frame() for _ in range(6)]
        reader.close()
        last_id = frames[-1][0]
        time.sleep(0.3)  # the generation goes on meanwhile
        resumed = Reader(c.nginx, {}, {"Last-Event-ID": last_id})
        assert resumed.status == 200 and resumed.served_by != reader.served_by
        rest = resumed.until_end()
        resumed.close()
        stream, seq = last_id.split(".")
        assert consecutive(rest, stream, int(seq))
        assert texts(frames) + texts(rest) == "".join(f"tok{i} " for i in range(40))
        assert rest[-2][1] == "finish" and json.loads(rest[-2][2])["reason"] == "stop"
        assert len(c.fake.requests) == 1 and c.fake.disconnects == []


def test_stop_on_another_instance_closes_the_upstream_within_100ms(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.fake.script = Script(tokens=2000, token_delay=0.02)
        reader = Reader(c.nginx, {"question": "q"})
        stream = json.loads(reader.frame()[2])["stream"]
        reader.frame()  # the first token: the upstream is streaming
        sent = time.monotonic()
        status, served_by = post_stop(c.nginx, stream)
        assert status == 204 and served_by not in ("", reader.served_by)
        eventually(lambda: len(c.fake.disconnects) == 1, timeout=5)
        took = c.fake.disconnects[0].at - sent
        assert took < 0.1, f"the upstream saw the close {took * 1000:.0f} ms after Stop was sent"
        frames = reader.until_end()
        reader.close()
        assert [(e, d) for _, e, d in frames[-2:]] == [("finish", '{"reason": "stopped"}'), END]


def test_kill_9_of_a_producer_gives_its_follower_elsewhere_the_cut_off_error_and_the_end(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.fake.script = Script(tokens=2000, token_delay=0.02)
        reader = Reader(c.nginx, {"question": "q"})
        frames = [reader.frame() for _ in range(3)]
        reader.close()
        follower = Reader(c.nginx, {}, {"Last-Event-ID": frames[-1][0]})
        assert follower.status == 200 and follower.served_by != reader.served_by
        followed = [follower.frame() for _ in range(5)]
        c.process(reader.served_by).kill()  # SIGKILL: no drain, no last frames
        killed = time.monotonic()
        rest = follower.until_end()
        took = time.monotonic() - killed
        follower.close()
        stream, seq = frames[-1][0].split(".")
        assert consecutive(followed + rest, stream, int(seq))
        assert rest[-2][1] == "error" and json.loads(rest[-2][2])["code"] == "stream_lost"
        assert "stopped before it was complete" in json.loads(rest[-2][2])["message"]
        assert took < 6.0, f"the follower waited {took:.1f} s"


def test_sigterm_of_one_instance_ends_its_streams_while_the_others_serve_its_conversations(
        tmp_path: Path) -> None:
    with cluster(tmp_path, "--drain-timeout", "0.5") as c:
        c.fake.script = Script(tokens=2000, token_delay=0.02)
        reader = Reader(c.nginx, {"question": "q0"})
        meta = json.loads(reader.frame()[2])
        token = reader.frame()
        process = c.process(reader.served_by)
        process.send_signal(signal.SIGTERM)
        frames = [token, *reader.until_end()]
        reader.close()
        assert frames[-2][1] == "error" and json.loads(frames[-2][2])["code"] == "server_shutdown"
        assert process.wait(15) == 0
        answered = texts(frames)
        c.fake.script = Script(deltas=["still here"])
        for i in range(1, 4):  # whichever instance nginx picks, none is the one that stopped
            follow = Reader(c.nginx, {"question": f"q{i}", "conversation": str(meta["conversation"])})
            assert follow.status == 200 and follow.served_by != reader.served_by
            assert json.loads(follow.frame()[2])["restarted"] is False
            assert texts(follow.until_end()) == "still here"
            follow.close()
        assert c.fake.requests[1]["messages"][:2] == [
            {"role": "user", "content": "q0"},
            {"role": "assistant", "content": answered + CUT_OFF_NOTE}]


def test_killing_redis_mid_run_gives_clear_errors_then_recovers_without_a_crash(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.fake.script = Script(tokens=100, token_delay=0.03)
        local = Reader(c.nginx, {"question": "q"})  # read where it is produced
        local.frame()
        other = Reader(c.nginx, {"question": "q2"})
        frames = [other.frame() for _ in range(2)]
        other.close()
        follower = Reader(c.nginx, {}, {"Last-Event-ID": frames[-1][0]})  # read elsewhere
        assert follower.served_by != other.served_by
        follower.frame()
        c.redis.kill()
        # The stream read where it is produced needs no Redis: it finishes, every token.
        local_frames = local.until_end()
        assert texts(local_frames) == "".join(f"tok{i} " for i in range(100))
        # The one followed through Redis cannot go on: a clear error, then the end frame.
        rest = follower.until_end()
        assert rest[-2][1] == "error" and json.loads(rest[-2][2])["code"] == "store_unavailable"
        local.close()
        follower.close()
        # Every instance says so, and refuses new questions with a sentence, not a hang.
        for _, port, _ in c.instances:
            eventually(lambda: get_json(port, "/healthz")[0] == 503)
            assert get_json(port, "/healthz")[1]["store"] == "down"
        for _ in range(3):
            status, body = get_json(c.nginx, "/ask?question=q3", OWNER)
            assert status == 503 and body["error"]["code"] == "store_unavailable"  # type: ignore[index]
        c.redis.start()  # back on the same port, empty
        for _, port, _ in c.instances:
            eventually(lambda: get_json(port, "/healthz") == (200, {
                "status": "ok", "backend": "openai", "model": "test-model", "store": "up"}))
        c.fake.script = Script(deltas=["back"])
        for _ in range(3):
            again = Reader(c.nginx, {"question": "q4"})
            assert again.status == 200 and texts(again.until_end()) == "back"
            again.close()
        assert all(p.poll() is None for p, _, _ in c.instances)
        logs = "".join(line for _, _, lines in c.instances for line in lines)
        assert "Traceback" not in logs and "unreachable" in logs and "answers again" in logs
        assert API_KEY not in logs and "q3" not in logs


if os.environ.get("TORNADO_SSE_SKIP_MULTI"):  # pragma: no cover - a developer's shortcut
    pytestmark = pytest.mark.skip("TORNADO_SSE_SKIP_MULTI is set")
