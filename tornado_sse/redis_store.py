"""`--store redis://...`: what several instances share, on Redis (redis-py's asyncio client).

    tornado-sse:conversation:<id>   a string: the conversation as JSON, EX --conversation-ttl
    tornado-sse:rate:<client>       a hash: the client's token bucket (RATE_SCRIPT), expiring once full
    tornado-sse:stream:<id>         a hash: the stream's owner and instance, expiring with its frames
    tornado-sse:frames:<id>         a Redis Stream of the frames, entry id 0-<seq> (the frame's own
                                    <stream>.<seq>), MAXLEN ~ --resume-buffer, expiring --resume-grace
                                    after the last write; a last entry `end` (or `lost`) closes it
    tornado-sse:alive:<id>          the producer's heartbeat: PX ALIVE_TTL_MS, refreshed every second
    tornado-sse:control             pub/sub: "stop <id>", "attach <id>", "detach <id>" to the producer

The producer's readers here get each frame from memory, as with `--store memory`; `share` only
queues it, and one pipeline per loop iteration writes the queue (never awaited by a frame). While
Redis is down writes are dropped (at most MAX_PENDING queued), `up` is False, and a ping every
second brings it back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .conversations import Conversation, Turn, add_turn
from .guard import new_id
from .settings import Settings
from .store import PRODUCER_LOST, STORE_DOWN, StoreError

if TYPE_CHECKING:
    from .streams import Stream

log = logging.getLogger(__name__)

PREFIX = "tornado-sse:"
CONTROL = PREFIX + "control"
ALIVE_TTL_MS = 3000  # a follower notices a dead producer 3 to 4 s after its last heartbeat
HEARTBEAT = 1.0  # seconds between pings (health) and heartbeats (streams produced here)
KEEP_MS = 3000
# Writes start at most this often: a quiet stream's frame goes at the end of its loop iteration,
# a busy server's frames in one batch per interval. At 100 streams x 50 tok/s, one write per loop
# iteration cost 1.37x the memory store's CPU per token, one per 5 ms 1.25x (bench/run.py, README).
FLUSH_INTERVAL = 0.005  # a running stream's keys expire this long after the grace, unless refreshed
BLOCK_MS = 1000  # a follower's XREAD BLOCK; below the socket timeout
MAX_PENDING = 100_000  # frames queued for Redis at most; past it (Redis slow or down) they are dropped

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


# A batch's frames in one command: one XADD per frame inside Redis, instead of a command each to
# pack and a reply each to parse in Python. EVAL with the text, not a registered Script: in a
# pipeline redis-py's Script sends SCRIPT EXISTS first, a second round trip per batch; Redis
# compiles the text once and keeps it by its SHA1 (redis.io, EVAL).
# MAXLEN ~ lets Redis trim whole macro nodes, cheaply (redis.io, XADD). pcall: an id below the
# stream's last (never expected) skips that frame rather than the rest.
FRAMES_SCRIPT = """
for i = 1, #KEYS do
  redis.pcall('XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], '0-' .. ARGV[2 * i], 'f', ARGV[2 * i + 1])
end
return #KEYS
"""


class RemoteReader:
    """Stands in, on the producer, for a reader following from another instance: it keeps the
    resume grace from aborting the generation. The frames reach that reader through Redis."""

    async def send(self, frame: bytes) -> None:
        pass

    def end(self) -> None:
        pass

    def drop(self) -> None:
        pass


class RedisStore:
    name = "redis"
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
        self._pending: list[tuple[str, str, int, bytes]] = []  # (kind, stream id, seq, frame)
        self._scheduled = False
        self._last_write = 0.0  # loop time the last write started
        self._writing: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.dropped = 0

    @property
    def up(self) -> bool:
        return self._up

    def _down(self, exc: BaseException) -> None:
        if self._up:
            log.warning("store %s unreachable: %s", redacted(self.settings.store), exc)
        self._up = False

    async def start(self) -> None:
        try:
            await self.redis.ping()
            self._up = True
            log.info("store: %s", redacted(self.settings.store))
        except (RedisError, OSError) as exc:
            log.warning("store %s unreachable at start-up (%s): new questions get 503 until it "
                        "answers", redacted(self.settings.store), exc)
        self._tasks = [asyncio.ensure_future(self._heartbeat()), asyncio.ensure_future(self._listen())]

    async def close(self) -> None:
        self._flush()
        if self._writing is not None:
            await asyncio.wait([self._writing], timeout=2.0)
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
            if data["owner"] and data["owner"] == owner:  # ids are random, owners compared whole
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

    # -- frames: queued per token, written once per loop iteration ---------------------------------

    def share(self, stream: Stream, frame: bytes) -> None:
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(("f", stream.id, stream.seq, frame))
        if not self._scheduled:
            self._schedule()

    def started(self, stream: Stream) -> None:
        self._local[stream.id] = stream
        if self.shares_frames:
            self._pending.append(("start", stream.id, 0, stream.owner.encode()))

    def finished(self, stream: Stream) -> None:
        self._local.pop(stream.id, None)
        self._remote.pop(stream.id, None)
        if self.shares_frames:
            self._pending.append(("end" if stream.done else "lost", stream.id, stream.seq + 1, b""))
            self._flush()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._scheduled = True
        loop.call_at(max(loop.time(), self._last_write + FLUSH_INTERVAL), self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._writing is None and self._pending:
            batch, self._pending = self._pending, []
            self._last_write = asyncio.get_running_loop().time()
            self._writing = asyncio.ensure_future(self._write(batch))

    async def _write(self, batch: list[tuple[str, str, int, bytes]]) -> None:
        grace = round(self.settings.resume_grace * 1000)
        maxlen = self.settings.resume_buffer
        pipe = self.redis.pipeline(transaction=False)
        keys: list[str] = []
        args: list[int | bytes] = [maxlen]
        for kind, id, seq, frame in batch:
            if kind == "f":
                keys.append(PREFIX + "frames:" + id)
                args += (seq, frame)
                continue
            if keys:  # the frames so far go before this entry, in order
                pipe.eval(FRAMES_SCRIPT, len(keys), *keys, *args)
                keys, args = [], [maxlen]
            frames, meta, alive = (PREFIX + "frames:" + id, PREFIX + "stream:" + id,
                                   PREFIX + "alive:" + id)
            if kind == "start":  # the frames key's expiry is refreshed by the heartbeat
                pipe.hset(meta, mapping={"owner": frame})
                pipe.pexpire(meta, grace + KEEP_MS)
                pipe.set(alive, 1, px=ALIVE_TTL_MS)
            else:  # "end" or "lost": the last entry; the heartbeat goes; the grace starts
                pipe.xadd(frames, {kind: 1}, id=f"0-{seq}", maxlen=maxlen)
                pipe.hset(meta, "done", 1)
                pipe.delete(alive)
                pipe.pexpire(frames, grace)
                pipe.pexpire(meta, grace)
        if keys:
            pipe.eval(FRAMES_SCRIPT, len(keys), *keys, *args)
        try:
            # raise_on_error=False: one refused entry (an id below a trimmed one) must not fail the rest
            await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self._down(exc)
            self.dropped += len(batch)
        finally:
            self._writing = None
        if self._pending and not self._scheduled:
            self._schedule()

    # -- health, heartbeats, control -----------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.ping()
                if self.shares_frames:
                    keep = round(self.settings.resume_grace * 1000) + KEEP_MS
                    for id in self._local:
                        pipe.set(PREFIX + "alive:" + id, 1, px=ALIVE_TTL_MS)
                        # While it runs its frames outlive a producer's death by the grace.
                        pipe.pexpire(PREFIX + "frames:" + id, keep)
                        pipe.pexpire(PREFIX + "stream:" + id, keep)
                await pipe.execute()
                if not self._up:
                    log.info("store %s answers again", redacted(self.settings.store))
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
        return Follower(self, stream_id) if _owned(meta, owner) else None


def _owned(meta: dict[Any, Any], owner: str) -> bool:
    stored = meta.get(b"owner", b"").decode()
    return bool(stored) and stored == owner


class Follower:
    """A reader here of a stream another instance produces: what it missed, then live frames."""

    def __init__(self, store: RedisStore, stream_id: str):
        self.store = store
        self.id = stream_id
        self.key = PREFIX + "frames:" + stream_id
        self.last = 0
        self.ended = False  # its end frame was read
        self.lost = False  # its producer ended it without one (its task was cut short)

    async def backlog(self, after: int) -> list[bytes] | None:
        """The frames after seq `after`, or None when they are no longer all there (trimmed)."""
        try:
            pipe = self.store.redis.pipeline(transaction=False)
            pipe.xrange(self.key, "-", "+", count=1)
            pipe.xrange(self.key, f"0-{after + 1}", "+")
            first, entries = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.store._down(exc)
            return None
        if first and _seq(first[0][0]) > after + 1:
            return None
        self.last = after
        await self.store.redis.publish(CONTROL, "attach " + self.id)  # the producer's grace stops
        return self._take(entries)

    def _take(self, entries: list[Any]) -> list[bytes]:
        frames = []
        for entry_id, fields in entries:
            if b"f" not in fields:
                self.ended = b"end" in fields
                self.lost = not self.ended
                break
            self.last = _seq(entry_id)
            frames.append(fields[b"f"])
        return frames

    async def live(self) -> AsyncIterator[list[bytes]]:
        """Batches of frames as the producer writes them; StoreError when it died or Redis did."""
        redis = self.store.redis
        while not self.ended:
            if self.lost:
                raise StoreError(PRODUCER_LOST)
            result: Any  # RESP2's reply: [[key, [(entry id, fields), ...]]]
            try:
                result = await redis.xread({self.key: f"0-{self.last}"}, count=1000, block=BLOCK_MS)
                if not result and not await redis.exists(PREFIX + "alive:" + self.id):
                    result = await redis.xread({self.key: f"0-{self.last}"}, count=1000)
                    if not result:  # no heartbeat and nothing more: the producer is gone
                        raise StoreError(PRODUCER_LOST)
            except (RedisError, OSError) as exc:
                self.store._down(exc)
                raise StoreError(STORE_DOWN) from None
            if result:
                yield self._take(result[0][1])

    def detach(self) -> None:
        """This reader left: the producer's grace starts (fire and forget)."""
        if not self.ended and not self.lost:
            asyncio.ensure_future(_publish(self.store, "detach " + self.id))


async def _publish(store: RedisStore, message: str) -> None:
    try:
        await store.redis.publish(CONTROL, message)
    except (RedisError, OSError) as exc:
        store._down(exc)


def _seq(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[1])
