"""The registry the Application owns: every stream by id, the count the limits and the shutdown
use, and what happens when a stream's task ends (its turn kept, its slot released, its frames kept
for a reader that may come back within the resume grace)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from . import sse
from .backend import Backend
from .conversations import Conversation, Turn
from .guard import same_owner
from .store import Store
from .streams import Stream


class StreamRegistry:
    """Every stream the Application holds, by id: running ones count against `max_streams`;
    finished ones stay for the resume grace when a reader may still come back for their end."""

    def __init__(self, backend: Backend, store: Store, *, max_streams: int,
                 resume_grace: float, resume_buffer: int, pad_frames: bool = False):
        self.backend = backend
        self.store = store
        self.max_streams = max_streams
        self.resume_grace = resume_grace
        self.resume_buffer = resume_buffer
        self.pad_frames = pad_frames
        self._random: list[int] = []  # bytes from the OS's CSPRNG for the padding's random steps
        self.streams: dict[str, Stream] = {}
        self.running = 0
        self.draining = False
        self.on_start: list[Callable[[Stream], None]] = []
        self.on_finish: list[Callable[[Stream], None]] = []

    @property
    def full(self) -> bool:
        return self.running >= self.max_streams

    def start(self, conversation: Conversation, question: str, restarted: bool,
              client: str = "", owner: str = "") -> tuple[Stream, bytes]:
        """A new stream, its relay task started, and its first frame (Stream.open)."""
        stream = Stream(self, conversation, question, owner)
        stream.client = client
        self.streams[stream.id] = stream
        self.running += 1
        stream.task = asyncio.ensure_future(stream.run(self.backend, conversation.messages(question)))
        # A done callback, not a `finally`: a task cancelled before its first step never runs its
        # coroutine, and its slot must be released all the same.
        stream.task.add_done_callback(stream.task_done)
        self.store.started(stream)
        for callback in self.on_start:
            callback(stream)
        return stream, stream.open(restarted)  # numbered once the store knows the stream

    def pad_step(self) -> int:
        """A random 0..PAD_STEPS-1 for sse.pad. One urandom call per 4,096 frames: per frame,
        secrets.randbelow would be a system call and most of the padding's cost."""
        if not self._random:
            self._random = list(os.urandom(4096))
        return self._random.pop() % sse.PAD_STEPS  # 256 is a multiple of PAD_STEPS: no bias

    def get(self, stream_id: str, owner: str) -> Stream | None:
        """The stream, if `owner` started it: to anyone else it does not exist."""
        stream = self.streams.get(stream_id)
        return stream if stream is not None and same_owner(stream.owner, owner) else None

    def finished(self, stream: Stream) -> None:
        """A stream's relay task is done (Stream.task_done), however it ended."""
        self.running -= 1
        stream.finished_at = asyncio.get_running_loop().time()
        turn = take_turn(stream)
        if turn is not None:
            self.store.keep(stream.conversation, turn)
        self.store.finished(stream)
        if stream.frames is not None and stream.done:
            # Keep the last frames for the grace even when a reader was attached: written to its
            # socket is not read by it (a connection that drops now loses what was in flight), and
            # a reader that did see the end frame gets 204 when it comes back.
            asyncio.get_running_loop().call_later(self.resume_grace, self.streams.pop, stream.id, None)
        else:
            self.streams.pop(stream.id, None)
        for callback in self.on_finish:
            callback(stream)

    async def keep_turn(self, stream: Stream) -> None:
        """Add the stream's question and answer to its conversation, once."""
        turn = take_turn(stream)
        if turn is None:
            return
        try:
            # Bounded: a slow store must not hold the end frame back for long.
            await asyncio.wait_for(asyncio.shield(self.store.record(stream.conversation, turn)), 2.0)
        except (TimeoutError, asyncio.CancelledError):
            pass  # the write goes on (shielded); the end frame must go out all the same

    def frame(self, event: str, data: str, id: str) -> bytes:
        """A frame as Stream.number makes it, for frames written on a stream's behalf (a follower
        whose producer died)."""
        frame = sse.encode_event(event, data, id)
        return sse.pad(frame, self.pad_step()) if self.pad_frames else frame

    def shut_down_all(self) -> None:
        for stream in list(self.streams.values()):
            if not stream.done:
                stream.shut_down()


def take_turn(stream: Stream) -> Turn | None:
    """What a finished stream adds to its conversation, once (a shared store keeps it before the
    end frame, the memory store when the task ends): its question and answer, cut off or not;
    nothing when no answer came (the question was never answered: asking it again is the user's
    choice, and the model must not see an empty answer)."""
    if stream.recorded:
        return None
    stream.recorded = True
    if not stream.answer and stream.outcome != "done":
        return None
    return Turn(stream.question, "".join(stream.answer), cut_off=stream.outcome != "done")

