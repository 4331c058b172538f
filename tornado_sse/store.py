"""Where what outlives one request is kept: conversations, the per-client rate, and (with Redis)
the frames, Stop and liveness of streams other instances read. `--store memory` (the default)
keeps it in this process, exactly as before; `--store redis://...` shares it (redis_store.py).

The registry and the handlers only see this interface; the per-token path only sees `share`,
which never awaits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from .conversations import Conversation, ConversationStore, Turn
from .errors import Failure
from .guard import Gate, RateLimiter
from .settings import Settings

if TYPE_CHECKING:
    from .streams import Stream

STORE_DOWN = Failure("store_unavailable", "This server cannot reach its shared storage right now. "
                     "Please ask again in a moment.")
# A follower's producer stopped refreshing its heartbeat (killed, or cut off from Redis).
PRODUCER_LOST = Failure("stream_lost", "The server writing this answer stopped before it was "
                        "complete. Please ask again.")


class StoreError(Exception):
    """A shared store could not be used, or what it relayed broke off; the reader gets `failure`."""

    def __init__(self, failure: Failure):
        super().__init__(failure.code)
        self.failure = failure


class RemoteStream(Protocol):
    """A stream another instance produces, as a reader here follows it."""

    id: str
    last: int  # the seq of the last frame read
    ended: bool  # its last entry was read

    async def backlog(self, after: int) -> list[bytes] | None: ...  # None: no longer all kept

    def live(self) -> AsyncIterator[list[bytes]]: ...  # then the frames as they come

    def detach(self) -> None: ...  # this reader left: the producer's grace starts


class Store(Protocol):
    shared: bool  # other instances read it: a turn must be kept before the end frame goes out

    @property
    def up(self) -> bool: ...  # False while a shared store cannot be reached

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def open(self, id: str | None, owner: str) -> tuple[Conversation, bool]: ...

    async def record(self, conversation: Conversation, turn: Turn) -> None: ...

    def keep(self, conversation: Conversation, turn: Turn) -> None: ...  # record, not awaited

    async def take(self, client: str) -> float: ...  # the rate limit: 0, or seconds to wait

    def watch_sessions(self, gate: Gate) -> None: ...  # sign-outs reach every instance

    # Streams other instances may read or stop. `share` is on the per-token path: it never awaits.
    shares_frames: bool

    @property
    def dropped(self) -> int: ...  # shared frames that could not be written (the store slow or down)

    def share(self, stream: Stream, frame: bytes) -> None: ...

    def started(self, stream: Stream) -> None: ...

    def finished(self, stream: Stream) -> None: ...

    async def find(self, stream_id: str, owner: str) -> RemoteStream | None: ...

    async def stop(self, stream_id: str, owner: str) -> bool: ...  # True: a producer was told


class MemoryStore:
    """Everything in this process: one instance, no extra service. Streams stay in the registry."""

    shared = False
    up = True
    shares_frames = False
    dropped = 0

    def __init__(self, settings: Settings):
        self.conversations = ConversationStore(
            max_turns=settings.max_turns, max_chars=settings.max_conversation_chars,
            ttl=settings.conversation_ttl, max_conversations=settings.max_conversations,
            system_prompt=settings.system_prompt)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def open(self, id: str | None, owner: str) -> tuple[Conversation, bool]:
        return self.conversations.open(id, owner)

    async def record(self, conversation: Conversation, turn: Turn) -> None:
        self.conversations.record(conversation, turn)

    def keep(self, conversation: Conversation, turn: Turn) -> None:
        self.conversations.record(conversation, turn)

    async def take(self, client: str) -> float:
        return self.limiter.take(client)

    def watch_sessions(self, gate: Gate) -> None:
        pass

    def share(self, stream: Stream, frame: bytes) -> None:
        pass

    def started(self, stream: Stream) -> None:
        pass

    def finished(self, stream: Stream) -> None:
        pass

    async def find(self, stream_id: str, owner: str) -> RemoteStream | None:
        return None

    async def stop(self, stream_id: str, owner: str) -> bool:
        return False


def make_store(settings: Settings) -> Store:
    if settings.store == "memory":
        return MemoryStore(settings)
    from .redis_store import RedisStore  # redis is only imported when it is used
    return RedisStore(settings)
