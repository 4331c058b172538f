"""Streams across instances, on Redis: the producer's side (`FrameWriter`: each frame queued, the
queue written in batches, never awaited by a frame) and a reader's side on another instance
(`Follower`: the frames it missed, then live ones, and the end even when the producer died).

    tornado-sse:stream:<id>   a hash: the stream's owner, its instance, and `done` once it ended
    tornado-sse:frames:<id>   a Redis Stream of the frames, entry id 0-<seq> (the frame's own
                              <stream>.<seq>), MAXLEN ~ --resume-buffer, expiring --resume-grace
                              after the end; a last entry `end` (or `lost`) closes it
    tornado-sse:alive:<instance>  the producing instance's heartbeat: PX ALIVE_TTL_MS, refreshed
                              every second (one key per instance, not per stream: a heartbeat per
                              stream cost a burst of commands every second)
    tornado-sse:control       pub/sub: "stop <id>", "attach <id>", "detach <id>" to the producer
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .settings import Settings
from .store import PRODUCER_LOST, STORE_DOWN, StoreError

if TYPE_CHECKING:
    from .streams import Stream

PREFIX = "tornado-sse:"
CONTROL = PREFIX + "control"
ALIVE_TTL_MS = 3000  # a follower notices a dead producer 3 to 4 s after its last heartbeat
KEEP_MS = 30_000  # a running stream's keys expire this long after the grace, unless refreshed
REFRESH = 10.0  # seconds between those refreshes, with a batch of its frames
# Writes start at most this often: a quiet stream's frame goes at the end of its loop iteration,
# a busy server's frames in one batch per interval. At 100 streams x 50 tok/s, one write per loop
# iteration cost 1.37x the memory store's CPU per token, one per 5 ms 1.25x (bench/run.py, README).
FLUSH_INTERVAL = 0.005
BLOCK_MS = 1000  # a follower's XREAD BLOCK; below the socket timeout
MAX_PENDING = 100_000  # frames queued for Redis at most; past it (Redis slow or down) they are dropped

# A batch's frames in one command and one argument: "<stream id> <seq> <length>\n<frame>" after
# one another, one XADD each inside Redis. A command per frame cost a reply each to parse, and
# even one command with three arguments per frame spent most of the cost in redis-py packing
# each argument (cProfile: ~20 us a frame). EVAL with the text, not a registered Script: in a
# pipeline redis-py's Script sends SCRIPT EXISTS first, a second round trip per batch; Redis
# compiles the text once and keeps it by its SHA1 (redis.io, EVAL). The script names its keys
# itself (tornado-sse:frames:<id>), so it needs one Redis, not a Cluster. MAXLEN ~ lets Redis
# trim whole macro nodes, cheaply (redis.io, XADD). pcall: an id below the stream's last (never
# expected) skips that frame rather than the rest.
FRAMES_SCRIPT = """
local blob, maxlen, prefix = ARGV[1], ARGV[2], ARGV[3]
local pos, n = 1, 0
while pos <= #blob do
  local nl = string.find(blob, '\\n', pos, true)
  local id, seq, len = string.match(string.sub(blob, pos, nl - 1), '^(%S+) (%d+) (%d+)$')
  len = tonumber(len)
  redis.pcall('XADD', prefix .. id, 'MAXLEN', '~', maxlen, '0-' .. seq, 'f',
              string.sub(blob, nl + 1, nl + len))
  pos = nl + len + 1
  n = n + 1
end
return n
"""

OnError = Callable[[BaseException], None]  # the store marks itself down


class FrameWriter:
    """The producer's frames, queued per token and written in batches."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, on_error: OnError, instance: str):
        self.redis = redis
        self.instance = instance
        self._refreshed: dict[str, float] = {}  # stream id -> loop time its keys' expiry was pushed
        self.grace_ms = round(settings.resume_grace * 1000)
        self.maxlen = settings.resume_buffer
        self.on_error = on_error
        self._pending: list[tuple[str, str, int, bytes]] = []  # (kind, stream id, seq, frame)
        self._scheduled = False
        self._last_write = 0.0  # loop time the last write started
        self._writing: asyncio.Task[None] | None = None
        self.dropped = 0

    def share(self, stream: Stream, frame: bytes) -> None:
        """The per-token path: queue the frame, no await."""
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(("f", stream.id, stream.seq, frame))
        if not self._scheduled:
            self._schedule()

    def started(self, stream: Stream) -> None:
        self._pending.append(("start", stream.id, 0, stream.owner.encode()))
        if not self._scheduled:
            self._schedule()

    def finished(self, stream: Stream) -> None:
        self._pending.append(("end" if stream.done else "lost", stream.id, stream.seq + 1, b""))
        self._flush()

    async def close(self) -> None:
        self._flush()
        if self._writing is not None:
            await asyncio.wait([self._writing], timeout=2.0)

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
        grace, maxlen = self.grace_ms, self.maxlen
        now = asyncio.get_running_loop().time()
        refresh: list[str] = []
        pipe = self.redis.pipeline(transaction=False)
        parts: list[bytes] = []
        for kind, id, seq, frame in batch:
            if kind == "f":
                parts += (b"%s %d %d\n" % (id.encode(), seq, len(frame)), frame)
                if now - self._refreshed.get(id, now) > REFRESH:
                    self._refreshed[id] = now
                    refresh.append(id)
                continue
            if parts:  # the frames so far go before this entry, in order
                pipe.eval(FRAMES_SCRIPT, 0, b"".join(parts), maxlen, PREFIX + "frames:")
                parts = []
            frames, meta = PREFIX + "frames:" + id, PREFIX + "stream:" + id
            if kind == "start":
                pipe.hset(meta, mapping={"owner": frame, "instance": self.instance})
                pipe.pexpire(meta, grace + KEEP_MS)
                self.heartbeat(pipe)  # before the first of the heartbeat loop's
                self._refreshed[id] = now
                refresh.append(id)  # its frames key, once the first frame made it
            else:  # "end" or "lost": the last entry; the grace starts
                self._refreshed.pop(id, None)
                pipe.xadd(frames, {kind: 1}, id=f"0-{seq}", maxlen=maxlen)
                pipe.hset(meta, "done", 1)
                pipe.pexpire(frames, grace)
                pipe.pexpire(meta, grace)
        if parts:
            pipe.eval(FRAMES_SCRIPT, 0, b"".join(parts), maxlen, PREFIX + "frames:")
        for id in refresh:  # a running stream's keys outlive its producer's death by the grace
            if id in self._refreshed:
                pipe.pexpire(PREFIX + "frames:" + id, grace + KEEP_MS)
                pipe.pexpire(PREFIX + "stream:" + id, grace + KEEP_MS)
        try:
            # raise_on_error=False: one refused entry (an id below a trimmed one) must not fail the rest
            await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self.on_error(exc)
            self.dropped += sum(kind == "f" for kind, _, _, _ in batch)  # frames, not start/end
        finally:
            self._writing = None
        if self._pending and not self._scheduled:
            self._schedule()

    def heartbeat(self, pipe: Any) -> None:
        """Queue on `pipe` this instance's heartbeat (every second): its streams are alive."""
        pipe.set(PREFIX + "alive:" + self.instance, 1, px=ALIVE_TTL_MS)


class RemoteReader:
    """Stands in, on the producer, for a reader following from another instance: it keeps the
    resume grace from aborting the generation. The frames reach that reader through Redis."""

    def push(self, frames: bytes) -> None:
        return None

    def end(self, last: bytes) -> None:
        pass

    def drop(self) -> None:
        pass


class Follower:
    """A reader here of a stream another instance produces: what it missed, then live frames."""

    def __init__(self, redis: aioredis.Redis, on_error: OnError, stream_id: str, instance: str):
        self.redis = redis
        self.on_error = on_error
        self.id = stream_id
        self.alive = PREFIX + "alive:" + instance  # the producing instance's heartbeat
        self.key = PREFIX + "frames:" + stream_id
        self.last = 0
        self.ended = False  # its end frame was read
        self.lost = False  # its producer ended it without one (its task was cut short)

    async def backlog(self, after: int) -> list[bytes] | None:
        """The frames after seq `after`, or None when they are no longer all there (trimmed)."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xrange(self.key, "-", "+", count=1)
            pipe.xrange(self.key, f"0-{after + 1}", "+")
            first, entries = await pipe.execute()
            if first and _seq(first[0][0]) > after + 1:
                return None
            await self.redis.publish(CONTROL, "attach " + self.id)  # the producer's grace stops
        except (RedisError, OSError) as exc:
            self.on_error(exc)
            return None
        self.last = after
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
        redis = self.redis
        while not self.ended:
            if self.lost:
                raise StoreError(PRODUCER_LOST)
            result: Any  # RESP2's reply: [[key, [(entry id, fields), ...]]]
            try:
                result = await redis.xread({self.key: f"0-{self.last}"}, count=1000, block=BLOCK_MS)
                if not result and not await redis.exists(self.alive):
                    result = await redis.xread({self.key: f"0-{self.last}"}, count=1000)
                    if not result:  # no heartbeat and nothing more: the producer is gone
                        raise StoreError(PRODUCER_LOST)
            except (RedisError, OSError) as exc:
                self.on_error(exc)
                raise StoreError(STORE_DOWN) from None
            if result:
                yield self._take(result[0][1])

    def detach(self) -> None:
        """This reader left: the producer's grace starts (fire and forget)."""
        if not self.ended and not self.lost:
            asyncio.ensure_future(self._publish("detach " + self.id))

    async def _publish(self, message: str) -> None:
        try:
            await self.redis.publish(CONTROL, message)
        except (RedisError, OSError) as exc:
            self.on_error(exc)


def _seq(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[1])
