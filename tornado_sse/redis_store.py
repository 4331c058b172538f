"""`--store redis://...`: what several instances share, on Redis (redis-py's asyncio client).

    tornado-sse:conversation:<id>   a string: the conversation as JSON, EX --conversation-ttl
    tornado-sse:rate:<client>       a hash: the client's token bucket (RATE_SCRIPT), expiring once full
    (each stream's frames, owner, heartbeat and control messages: redis_frames.py)

The producer's readers here get each frame from memory, as with `--store memory`; `share` only
queues it for other instances. While Redis is down writes are dropped, `up` is False, new
questions get 503, and a ping every second brings it back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .conversations import Conversation, Turn, add_turn
from .guard import Gate, new_id, same_owner
from .settings import Settings
from .redis_frames import BLOCK_MS, CONTROL, PREFIX, Follower, FrameWriter, RemoteReader
from .store import STORE_DOWN, StoreError

if TYPE_CHECKING:
    from .streams import Stream

log = logging.getLogger(__name__)

HEARTBEAT = 1.0  # seconds between pings (health) and heartbeats (streams produced here)

# A token bucket per client, atomic in Redis (a script runs alone: redis.io, "Scripting with
# Lua"). Redis's own TIME, so the instances' clocks need not agree; the key expires once the
# bucket would be full again, so idle clients cost nothing. A fixed window (INCR + EXPIRE) would
# let a client ask twice its burst across a window's edge; the bucket is the in-memory limiter's
# rule (guard.RateLimiter), so both stores limit the same way. The wait is returned as a string:
# Lua numbers become integers in Redis replies.
RATE_SCRIPT = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = math.min(burst, (tonumber(b[1]) or burst) + math.max(0, now - (tonumber(b[2]) or now)) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return tostring(wait)
"""


def redacted(url: str) -> str:
    """The store URL as logs show it: without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStore:
    shared = True
    shares_frames: bool

    def __init__(self, settings: Settings):
        self.settings = settings
        # A URL's own password wins (redis-py's from_url); else TORNADO_SSE_STORE_PASSWORD.
        password = None if urlsplit(settings.store).password else settings.store_password
        # One retry without back-off: a slow or dead Redis must fail a request in seconds, and the
        # health loop below does the reconnecting. socket_timeout bounds every command (redis-py
        # raises TimeoutError), above the followers' XREAD BLOCK.
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            settings.store, password=password, socket_timeout=BLOCK_MS / 1000 + 1.0,
            socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 1))
        self.rate = self.redis.register_script(RATE_SCRIPT)
        self.shares_frames = settings.resume_grace > 0  # without a grace nobody can come back
        self._up = False
        self._local: dict[str, Stream] = {}  # streams produced here, by id
        self._remote: dict[str, RemoteReader] = {}
        self.instance = new_id()  # names this process's heartbeat key
        self.writer = FrameWriter(self.redis, settings, self._down, self.instance)
        self.share = self.writer.share  # the per-token path: no call in between
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._gate: Gate | None = None

    @property
    def up(self) -> bool:
        return self._up

    @property
    def dropped(self) -> int:
        return self.writer.dropped

    def _down(self, exc: BaseException) -> None:
        if self._up:
            log.warning("store %s unreachable: %s", redacted(self.settings.store), exc)
        self._up = False

    async def start(self) -> None:
        try:
            await self.redis.ping()
            self._up = True
            log.info("store: %s", redacted(self.settings.store))
            await self._load_revoked()
        except (RedisError, OSError) as exc:
            log.warning("store %s unreachable at start-up (%s): new questions get 503 until it "
                        "answers", redacted(self.settings.store), exc)
        self._tasks = [asyncio.ensure_future(self._heartbeat()), asyncio.ensure_future(self._listen())]

    async def close(self) -> None:
        await self.writer.close()
        # The listener ends by itself within a second: a cancel can be lost inside redis-py's
        # PubSub.get_message (seen with redis-py 8.1: the task stayed "cancelling" for good).
        self._closing = True
        self._tasks[0].cancel()
        await asyncio.wait(self._tasks, timeout=2.0)
        for task in self._tasks:
            task.cancel()
        await self.redis.aclose()

    # -- conversations and the rate ----------------------------------------------------------------

    async def open(self, id: str | None, owner: str) -> tuple[Conversation, bool]:
        try:
            raw = await self.redis.get(PREFIX + "conversation:" + id) if id else None
        except (RedisError, OSError) as exc:
            self._down(exc)
            raise StoreError(STORE_DOWN) from None
        if id and raw is not None:
            data = json.loads(raw)
            if same_owner(data["owner"], owner):
                turns = [Turn(q, a, bool(c)) for q, a, c in data["turns"]]
                return Conversation(id, owner, turns, system=data["system"]), False
        return Conversation(new_id(), owner, system=self.settings.system_prompt), bool(id)

    async def record(self, conversation: Conversation, turn: Turn) -> None:
        add_turn(conversation, turn, self.settings.max_turns, self.settings.max_conversation_chars)
        data = {"owner": conversation.owner, "system": conversation.system,
                "turns": [[t.question, t.answer, t.cut_off] for t in conversation.turns]}
        try:
            await self.redis.set(PREFIX + "conversation:" + conversation.id, json.dumps(data),
                                 ex=max(1, round(self.settings.conversation_ttl)))
        except (RedisError, OSError) as exc:
            self._down(exc)
            log.warning("a turn of a conversation was not kept: the store is unreachable")

    def keep(self, conversation: Conversation, turn: Turn) -> None:
        asyncio.ensure_future(self.record(conversation, turn))

    async def take(self, client: str) -> float:
        if self.settings.rate_limit <= 0:
            return 0.0
        try:
            wait = await self.rate(keys=[PREFIX + "rate:" + client],
                                   args=[self.settings.rate_limit / 60.0, self.settings.rate_burst])
        except (RedisError, OSError) as exc:
            self._down(exc)
            raise StoreError(STORE_DOWN) from None
        return float(wait)

    # -- sign-outs ------------------------------------------------------------------------------------

    def watch_sessions(self, gate: Gate) -> None:
        """A sign-out on any instance ends the session on all: a key for instances that start
        later (expiring with the cookie's max age), and a message for the running ones."""
        self._gate = gate
        gate.on_revoke.append(self._share_revoked)

    def _share_revoked(self, session: str) -> None:
        asyncio.ensure_future(self._revoke(session))

    async def _revoke(self, session: str) -> None:
        try:
            await self.redis.set(PREFIX + "revoked:" + session, 1,
                                 ex=max(1, round(self.settings.session_max_age)))
            await self.redis.publish(CONTROL, "revoke " + session)
        except (RedisError, OSError) as exc:
            self._down(exc)
            log.warning("a sign-out could not be shared: the store is unreachable")

    async def _load_revoked(self) -> None:
        if self._gate is None:
            return
        async for key in self.redis.scan_iter(match=PREFIX + "revoked:*", count=1000):
            self._gate.revoke(key.decode().rsplit(":", 1)[1], tell=False)

    # -- streams other instances read --------------------------------------------------------------

    def started(self, stream: Stream) -> None:
        self._local[stream.id] = stream
        if self.shares_frames:
            self.writer.started(stream)

    def finished(self, stream: Stream) -> None:
        self._local.pop(stream.id, None)
        self._remote.pop(stream.id, None)
        if self.shares_frames:
            self.writer.finished(stream)

    # -- health, heartbeats, control -----------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.ping()
                if self.shares_frames:
                    self.writer.heartbeat(pipe)
                await pipe.execute()
                if not self._up:
                    log.info("store %s answers again", redacted(self.settings.store))
                    await self._load_revoked()  # sign-outs made while it was out of reach
                self._up = True
            except (RedisError, OSError) as exc:
                self._down(exc)

    async def _listen(self) -> None:
        """Stop, attach and detach from other instances. A new PubSub after each failure: redis-py's
        asyncio PubSub does not reconnect a closed connection by itself (redis/redis-py#2089)."""
        backoff = 0.1
        while not self._closing:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CONTROL)
                backoff = 0.1
                while not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._control(message["data"])
            except (RedisError, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass

    def _control(self, data: bytes) -> None:
        command, _, id = data.decode("ascii", "replace").partition(" ")
        if command == "revoke" and self._gate is not None:
            self._gate.revoke(id, tell=False)
            return
        stream = self._local.get(id)
        if stream is None:
            return
        if command == "stop":
            stream.stop()
        elif command == "attach":
            stream.attach(self._remote.setdefault(id, RemoteReader()))
        elif command == "detach" and id in self._remote:
            stream.detach(self._remote[id])

    async def stop(self, stream_id: str, owner: str) -> bool:
        try:
            meta = await self.redis.hgetall(PREFIX + "stream:" + stream_id)
            if not _owned(meta, owner) or meta.get(b"done"):
                return False
            await self.redis.publish(CONTROL, "stop " + stream_id)
        except (RedisError, OSError) as exc:
            self._down(exc)
            raise StoreError(STORE_DOWN) from None
        return True

    async def find(self, stream_id: str, owner: str) -> Follower | None:
        try:
            meta = await self.redis.hgetall(PREFIX + "stream:" + stream_id)
        except (RedisError, OSError) as exc:
            self._down(exc)
            return None
        if not _owned(meta, owner):
            return None
        instance = meta.get(b"instance", b"")
        return Follower(self.redis, self._down, stream_id,
                        instance.decode() if isinstance(instance, bytes) else str(instance))


def _owned(meta: dict[Any, Any], owner: str) -> bool:
    return same_owner(meta.get(b"owner", b"").decode(), owner)


