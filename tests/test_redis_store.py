"""`--store`: both stores through the same tests, against a real redis-server; then two real
servers in this process sharing one Redis, in front of the fake upstream: a follow-up, a resume
and a Stop on the instance that did not start the answer; Redis going away and coming back.
(Three instances as processes behind nginx: test_multi_instance.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import tornado.netutil
from tornado.httpclient import AsyncHTTPClient

from tornado_sse.app import make_app, make_server
from tornado_sse.backend import OpenAIBackend
from tornado_sse.conversations import Turn
from tornado_sse.demo import Script
from tornado_sse.redis_store import redacted
from tornado_sse.settings import Settings, SettingsError
from tornado_sse.store import MemoryStore, Store, make_store
from tornado_sse.registry import StreamRegistry

from .conftest import OWNER
from .redisserver import RedisServer, redis_server
from .sseclient import ask, open_raw, parse_events, read_until
from .test_access import TOKEN, sign_in
from .test_cli import CLEAN_ENV
from .test_public import _events_with_ids

pytestmark = pytest.mark.gen_test
END = ("update", "<END_STREAMING_SSE>")
SECRET = "Zq7xV2mK9pL4wR8tN3bY6cH1"
OWNER_ID = OWNER["Cookie"].split("=", 1)[1]


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def shared(settings: Settings, url: str, **changes: object) -> Settings:
    changes = {"resume_grace": 5.0, **changes}
    return dataclasses.replace(settings, store=url, session_secret=SECRET, **changes)  # type: ignore[arg-type]


@asynccontextmanager
async def instance(settings: Settings) -> AsyncIterator[tuple[str, StreamRegistry]]:
    """One real server with its store started, as the CLI starts it."""
    backend = OpenAIBackend(settings)
    app = make_app(settings, backend)
    registry: StreamRegistry = app.settings["registry"]
    await registry.store.start()
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = make_server(app, settings)
    server.add_sockets([sock])
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", registry
    finally:
        server.stop()
        for stream in list(registry.streams.values()):
            stream.abort()
        await asyncio.sleep(0.05)
        await registry.store.close()
        await backend.close()


def answer_of(raw: bytes) -> str:
    """The answer text of a whole raw response; an error frame fails the test."""
    events = [(e, d) for _, e, d in _events_with_ids(raw)]
    assert ("error" not in [e for e, _ in events]) and events[-1] == END
    return "".join(d for e, d in events[:-1] if e == "update")


async def eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# -- the store interface: both implementations, the same behaviour --------------------------------

@asynccontextmanager
async def a_store(kind: str, settings: Settings, redis: RedisServer) -> AsyncIterator[Store]:
    store = make_store(shared(settings, redis.url) if kind == "redis" else settings)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_both_stores_keep_a_conversation_for_its_owner_only(kind, settings, redis):
    settings = dataclasses.replace(settings, max_turns=2, system_prompt="Be brief.")
    async with a_store(kind, settings, redis) as store:
        assert isinstance(store, MemoryStore) == (kind == "memory")
        conversation, restarted = await store.open(None, OWNER_ID)
        assert restarted is False and conversation.turns == []
        for i in range(3):
            await store.record(conversation, Turn(f"q{i}", f"a{i}", cut_off=i == 2))
        again, restarted = await store.open(conversation.id, OWNER_ID)
        assert restarted is False and again.id == conversation.id
        assert again.turns == [Turn("q1", "a1"), Turn("q2", "a2", cut_off=True)]  # max_turns 2
        assert again.messages("q3")[0] == {"role": "system", "content": "Be brief."}
        stranger, restarted = await store.open(conversation.id, "another-owner-0123456789abc")
        assert restarted is True and stranger.id != conversation.id and stranger.turns == []
        unknown, restarted = await store.open("no-such-conversation-id-000", OWNER_ID)
        assert restarted is True and unknown.turns == []


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_both_stores_rate_limit_a_client_the_same_way(kind, settings, redis):
    settings = dataclasses.replace(settings, rate_limit=6.0, rate_burst=2)
    async with a_store(kind, settings, redis) as store:
        assert [await store.take("10.0.0.1") for _ in range(2)] == [0.0, 0.0]
        wait = await store.take("10.0.0.1")
        assert 9.0 < wait <= 10.0  # one question per 10 s once the burst is spent
        assert await store.take("10.0.0.2") == 0.0  # another client has its own bucket


async def test_the_redis_rate_limit_holds_across_instances(settings, redis):
    settings = dataclasses.replace(settings, rate_limit=6.0, rate_burst=2)
    async with a_store("redis", settings, redis) as a, a_store("redis", settings, redis) as b:
        assert await a.take("10.0.0.1") == 0.0
        assert await b.take("10.0.0.1") == 0.0
        assert await a.take("10.0.0.1") > 9.0 and await b.take("10.0.0.1") > 9.0


async def test_conversations_in_redis_expire_after_the_ttl(settings, redis):
    async with a_store("redis", dataclasses.replace(settings, conversation_ttl=1.0), redis) as store:
        conversation, _ = await store.open(None, OWNER_ID)
        await store.record(conversation, Turn("q", "a"))
        await asyncio.sleep(2.2)
        _, restarted = await store.open(conversation.id, OWNER_ID)
        assert restarted is True


def test_a_redis_store_without_a_shared_session_secret_is_refused() -> None:
    with pytest.raises(SettingsError, match="--session-secret.*shared by every instance"):
        Settings(store="redis://127.0.0.1:6379/0")
    with pytest.raises(SettingsError, match="invalid --store: 'mysql://x'"):
        Settings(store="mysql://x", session_secret=SECRET)
    assert "hunter2" not in repr(Settings(store="redis://:hunter2@h:6379/0", session_secret=SECRET))


# -- two servers, one Redis --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_question_that_got_no_answer_adds_no_turn_in_either_store(kind, settings, fake, redis):
    # The Redis store keeps a turn before the end frame (Stream.run), the memory store when the
    # task ends (StreamRegistry.finished): the same rule (registry.take_turn) for both.
    async with instance(shared(settings, redis.url) if kind == "redis" else settings) as (url, _):
        fake.script = Script(fail="status", status=400)
        failed = await ask(url, "question=first", headers=OWNER)
        assert failed.errors and failed.text == ""
        fake.script = Script(deltas=["ok"])
        follow = await ask(url, f"question=second&conversation={failed.meta['conversation']}",
                           headers=OWNER)
        # (memory keeps the empty conversation, Redis stores one only with its first turn)
        assert follow.text == "ok" and follow.meta["restarted"] is (kind == "redis")
        assert fake.requests[-1]["messages"] == [{"role": "user", "content": "second"}]


async def test_a_follow_up_on_another_instance_continues_the_conversation(settings, fake, redis):
    fake.script = Script(deltas=["Paris", "."])
    async with instance(shared(settings, redis.url)) as (a, _), \
            instance(shared(settings, redis.url)) as (b, _):
        first = await ask(a, "question=Capital%20of%20France%3F", headers=OWNER)
        follow = await ask(b, f"question=And%20Italy%3F&conversation={first.meta['conversation']}",
                           headers=OWNER)
        assert follow.meta["restarted"] is False and follow.meta["conversation"] == first.meta["conversation"]
        assert fake.requests[1]["messages"] == [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And Italy?"}]
        # another browser's id is unknown on every instance
        stranger = await ask(b, f"question=x&conversation={first.meta['conversation']}")
        assert stranger.meta["restarted"] is True


async def test_a_resume_on_another_instance_gets_the_exact_rest_with_one_upstream_request(
        settings, fake, redis):
    expected = "".join(f"tok{i} " for i in range(30))
    fake.script = Script(tokens=30, token_delay=0.03)
    async with instance(shared(settings, redis.url)) as (a, _), \
            instance(shared(settings, redis.url)) as (b, _):
        reader, writer = await open_raw(int(a.rsplit(":", 1)[1]), "/ask?question=q", OWNER)
        first = await read_until(reader, b"event: update", 5)
        writer.close()
        events = _events_with_ids(first)
        last_id = [i for i, e, d in events if i][-1]
        seen = "".join(d for i, e, d in events if e == "update")
        await asyncio.sleep(0.3)  # the generation goes on on instance a meanwhile
        rest = await AsyncHTTPClient().fetch(b + "/ask", headers={"Last-Event-ID": last_id, **OWNER},
                                             request_timeout=20)
        stream, seq = last_id.split(".")
        body = rest.body.decode()
        # the frames, byte for byte as a produced them, numbered on from the last one seen
        ids = [line[4:] for line in body.split("\n") if line.startswith("id: ")]
        assert ids == [f"{stream}.{n}" for n in range(int(seq) + 1, int(seq) + 1 + len(ids))]
        rest_events = parse_events(rest.body)
        assert rest_events[-2][0] == "finish" and rest_events[-1] == END
        assert seen + "".join(d for e, d in rest_events[:-1] if e == "update") == expected
        assert len(fake.requests) == 1 and fake.disconnects == []
        # read to its end: a reconnect from its end frame's id gets 204 on either instance
        for base in (a, b):
            done = await AsyncHTTPClient().fetch(base + "/ask", raise_error=False, headers={
                "Last-Event-ID": ids[-1], **OWNER})
            assert done.code == 204
        # and a stranger's reconnect is a stranger's: 204, nothing replayed
        other = await AsyncHTTPClient().fetch(b + "/ask", raise_error=False,
                                              headers={"Last-Event-ID": last_id})
        assert other.code == 204 and other.body == b""


async def test_stop_on_another_instance_closes_the_upstream_within_100ms(settings, fake, redis):
    fake.script = Script(tokens=1000, token_delay=0.02)
    async with instance(shared(settings, redis.url)) as (a, _), \
            instance(shared(settings, redis.url)) as (b, _):
        reader, writer = await open_raw(int(a.rsplit(":", 1)[1]), "/ask?question=q", OWNER)
        first = await read_until(reader, b"event: update")
        stream_id = _events_with_ids(first)[0][0].split(".")[0]
        sent = time.monotonic()
        stopped = await AsyncHTTPClient().fetch(b + f"/stop?stream={stream_id}", method="POST",
                                                body=b"", headers=OWNER)
        assert stopped.code == 204
        await eventually(lambda: len(fake.disconnects) == 1, timeout=5)
        assert fake.disconnects[0].at - sent < 0.1
        rest = first + await read_until(reader, b"<END_STREAMING_SSE>")
        events = [(e, d) for _, e, d in _events_with_ids(rest)]
        assert events[-2:] == [("finish", '{"reason": "stopped"}'), END]
        writer.close()
        stranger = await AsyncHTTPClient().fetch(b + f"/stop?stream={stream_id}", method="POST",
                                                 body=b"", raise_error=False)
        assert stranger.code == 404


async def test_while_redis_is_down_questions_get_503_open_streams_finish_and_it_recovers(
        settings, fake, redis):
    fake.script = Script(tokens=40, token_delay=0.05)
    async with instance(shared(settings, redis.url)) as (a, registry):
        health = await AsyncHTTPClient().fetch(a + "/healthz")
        assert json.loads(health.body)["store"] == "up"
        reader, writer = await open_raw(int(a.rsplit(":", 1)[1]), "/ask?question=q", OWNER)
        first = await read_until(reader, b"event: update")
        redis.kill()
        # the open stream does not need Redis: it ends as usual, every token and the end frame
        rest = await read_until(reader, b"<END_STREAMING_SSE>")
        assert answer_of(first + rest) == "".join(f"tok{i} " for i in range(40))
        writer.close()
        # ... but its frames for other instances could not be written: the operator sees how many
        writer_ = registry.store.writer  # type: ignore[attr-defined]
        await eventually(lambda: registry.store.dropped > 0 and writer_._writing is None
                         and not writer_._pending, timeout=5)  # and nothing more to write
        scraped = (await AsyncHTTPClient().fetch(a + "/metrics")).body.decode()
        dropped = re.search(r"^tornado_sse_shared_frames_dropped_total (\S+)$", scraped, re.M)
        assert dropped and float(dropped.group(1)) == registry.store.dropped
        refused = await ask(a, "question=q2", headers=OWNER)
        assert refused.status == 503 and refused.headers["Retry-After"] == "5"
        assert json.loads(refused.body)["error"]["code"] == "store_unavailable"
        assert "shared storage" in json.loads(refused.body)["error"]["message"]
        health = await AsyncHTTPClient().fetch(a + "/healthz", raise_error=False)
        assert health.code == 503 and json.loads(health.body)["store"] == "down"
        redis.start()  # the same port: the server finds it again by itself
        await eventually(lambda: registry.store.up, timeout=10)
        fake.script = Script(deltas=["back"])
        again = await ask(a, "question=q3", headers=OWNER)
        assert again.status == 200 and again.text == "back"
        health = await AsyncHTTPClient().fetch(a + "/healthz")
        assert json.loads(health.body) == {"status": "ok", "backend": "openai", "model": "test-model",
                                           "store": "up"}


async def test_a_server_started_while_redis_is_unreachable_serves_503_until_it_answers(settings, fake):
    redis = RedisServer()  # a free port, nothing listening yet
    try:
        async with instance(shared(settings, redis.url)) as (a, registry):
            refused = await ask(a, "question=q", headers=OWNER)
            assert refused.status == 503 and json.loads(refused.body)["error"]["code"] == "store_unavailable"
            redis.start()
            await eventually(lambda: registry.store.up, timeout=10)
            fake.script = Script(deltas=["ok"])
            assert (await ask(a, "question=q", headers=OWNER)).text == "ok"
    finally:
        redis.kill()


@pytest.mark.gen_test(timeout=40)
async def test_a_slow_redis_gives_503_within_seconds_while_a_local_stream_goes_on(settings, fake, redis):
    fake.script = Script(tokens=60, token_delay=0.05)
    async with instance(shared(settings, redis.url)) as (a, registry):
        reader, writer = await open_raw(int(a.rsplit(":", 1)[1]), "/ask?question=q", OWNER)
        first = await read_until(reader, b"event: update")
        redis.command("DEBUG", "SLEEP", "8")  # Redis answers nothing for 8 s
        slow = time.monotonic()
        await eventually(lambda: not registry.store.up, timeout=8)
        assert time.monotonic() - slow < 5  # the heartbeat's command timed out (2 s), not 8 s
        refused = await ask(a, "question=q2", headers=OWNER, timeout=20)
        assert refused.status == 503 and json.loads(refused.body)["error"]["code"] == "store_unavailable"
        rest = await read_until(reader, b"<END_STREAMING_SSE>")
        assert answer_of(first + rest) == "".join(f"tok{i} " for i in range(60))
        writer.close()
        await eventually(lambda: registry.store.up, timeout=15)
        fake.script = Script(deltas=["ok"])
        assert (await ask(a, "question=q3", headers=OWNER)).text == "ok"


async def test_the_password_comes_from_the_url_or_the_environment_and_is_never_logged(settings, caplog):
    caplog.set_level(logging.INFO)
    password = "s3cret-redis-Passw0rd-9x"
    server = RedisServer(password=password)
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        for store_settings in (shared(settings, url, store_password=password),
                               shared(settings, f"redis://:{password}@127.0.0.1:{server.port}/0")):
            store = make_store(store_settings)
            await store.start()
            try:
                assert store.up and await store.take("10.0.0.9") == 0.0
            finally:
                await store.close()
        store = make_store(shared(settings, url))  # no password: Redis refuses, the server says so
        await store.start()
        assert not store.up
        await store.close()
    finally:
        server.kill()
    assert password not in caplog.text and "***" in caplog.text


def test_a_store_url_is_logged_without_its_password() -> None:
    assert redacted("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redacted("rediss://user:pw@h/1") == "rediss://user:***@h/1"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"


async def test_a_sign_in_on_one_instance_is_valid_on_another_with_the_shared_secret(settings, fake, redis):
    fake.script = Script(deltas=["ok"])
    signed = shared(settings, redis.url, access_token=TOKEN)
    async with instance(signed) as (a, _), instance(signed) as (b, _):
        cookie = await sign_in(a)
        answer = await ask(b, "question=q", headers={"Cookie": cookie + "; " + OWNER["Cookie"]})
        assert answer.status == 200 and answer.text == "ok"
        assert (await ask(b, "question=q", headers=OWNER)).status == 401  # it is the cookie


def test_the_server_refuses_to_start_on_redis_without_a_shared_session_secret() -> None:
    run = subprocess.run([sys.executable, "-m", "tornado_sse", "--store", "redis://127.0.0.1:1/0"],
                         capture_output=True, text=True, env=CLEAN_ENV, timeout=30)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "invalid --session-secret" in run.stderr and "shared by every instance" in run.stderr


async def test_signing_out_on_one_instance_ends_the_session_on_the_others(settings, fake, redis):
    fake.script = Script(deltas=["ok"])
    signed = shared(settings, redis.url, access_token=TOKEN)
    async with instance(signed) as (a, _), instance(signed) as (b, _):
        cookie = {"Cookie": (await sign_in(a)) + "; " + OWNER["Cookie"]}
        assert (await ask(b, "question=q", headers=cookie)).status == 200
        out = await AsyncHTTPClient().fetch(a + "/logout", method="POST", body=b"", headers=cookie,
                                            follow_redirects=False, raise_error=False)
        assert out.code == 303
        statuses: list[int] = []

        async def refused_on_b() -> bool:
            statuses.append((await ask(b, "question=q", headers=cookie)).status)
            return statuses[-1] == 401
        deadline = time.monotonic() + 5
        while not await refused_on_b():
            assert time.monotonic() < deadline, statuses
            await asyncio.sleep(0.05)
        async with instance(signed) as (c, _):  # an instance started after the sign-out knows it
            assert (await ask(c, "question=q", headers=cookie)).status == 401
