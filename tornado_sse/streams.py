"""One generation per question: the relay task that reads the backend and numbers the frames, the
connection that currently reads them, and the registry the Application owns.

A stream outlives its connection only when `--resume-grace` allows: then a browser that comes back
with `Last-Event-ID` gets the frames it missed from a bounded buffer and follows live, and no second
upstream request is ever made. Otherwise a lost connection aborts the generation at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import deque
from collections.abc import Callable
from typing import Protocol

from . import sse
from .backend import Backend, Message
from .conversations import Conversation, ConversationStore, Turn
from .errors import Failure, cause_chain, describe

log = logging.getLogger(__name__)

SHUTTING_DOWN = Failure("server_shutdown", "The server is restarting. Please ask again in a moment.")


class Listener(Protocol):
    """The connection reading a stream (AskHandler)."""

    async def send(self, frame: bytes) -> None: ...  # never raises: a failed send detaches it

    def end(self) -> None: ...  # the stream is over: finish the response

    def drop(self) -> None: ...  # another connection took over: close this one


class Stream:
    def __init__(self, registry: StreamRegistry, conversation: Conversation, question: str):
        self.id = secrets.token_urlsafe(12)
        self.registry = registry
        self.conversation = conversation
        self.question = question
        self.seq = 0
        grace = registry.resume_grace
        self.frames: deque[bytes] | None = deque(maxlen=registry.resume_buffer) if grace > 0 else None
        self.listener: Listener | None = None
        self.answer: list[str] = []
        self.done = False  # the end frame has been emitted
        self.outcome = "aborted"
        self.error: BaseException | None = None
        self.stop_failure: Failure | None = None
        self.client = ""
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        self.first_token_at: float | None = None
        self.finished_at = self.started_at
        self.task: asyncio.Task[None] | None = None
        self._grace_timer: asyncio.TimerHandle | None = None

    # -- the relay: backend deltas -> numbered frames -> the listener --------------------------

    async def run(self, backend: Backend, messages: list[Message], restarted: bool) -> None:
        meta = {"conversation": self.conversation.id, "stream": self.id, "restarted": restarted}
        await self.emit("meta", json.dumps(meta))
        upstream = backend.stream(messages)
        failure: Failure | None = None
        try:
            try:
                async for event, text in upstream:
                    if event == "update":
                        if not self.answer:
                            self.first_token_at = asyncio.get_running_loop().time()
                        self.answer.append(text)
                        for part in sse.update_parts(text):
                            await self.emit("update", part)
                    else:
                        await self.emit(event, text)
            except asyncio.CancelledError:
                if self.stop_failure is None:
                    raise  # the reader left, or pressed Stop
                failure = self.stop_failure
            except Exception as exc:
                failure = describe(exc)
                self.error = exc
                log.warning("stream %s failed (%s): %s", self.id, failure.code, cause_chain(exc),
                            exc_info=failure.code == "internal_error")
        finally:
            await upstream.aclose()  # closes the upstream response, whatever happened
        if failure is not None:
            self.outcome = failure.code
            await self.emit("error", json.dumps({"code": failure.code, "message": failure.message}))
        else:
            self.outcome = "done"
        await self.emit("update", sse.END_MARKER)
        self.done = True
        if self.listener is not None:
            self.listener.end()

    async def emit(self, event: str, data: str) -> None:
        self.seq += 1
        frame = sse.encode_event(event, data, f"{self.id}.{self.seq}")
        if self.frames is not None:
            self.frames.append(frame)
        if self.listener is not None:
            await self.listener.send(frame)

    # -- who reads it ----------------------------------------------------------------------------

    def attach(self, listener: Listener, after: int | None = None) -> list[bytes] | None:
        """`listener` reads from now on; returns the frames after seq `after` to replay first, or
        None when they are no longer buffered (the caller says the answer was cut off)."""
        backlog: list[bytes] = []
        if after is not None:
            if self.frames is None or after + 1 < self.seq - len(self.frames) + 1 or after > self.seq:
                return None
            backlog = list(self.frames)[len(self.frames) - (self.seq - after):] if after < self.seq else []
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if self.listener is not None and self.listener is not listener:
            self.listener.drop()
        self.listener = None if self.done else listener
        return backlog

    def detach(self, listener: Listener) -> None:
        """The reader went away (closed, too slow): abort now, or after the resume grace."""
        if self.listener is not listener:
            return
        self.listener = None
        grace = self.registry.resume_grace
        if self.done:
            return
        if grace <= 0:
            self.abort()
        else:
            self._grace_timer = asyncio.get_running_loop().call_later(grace, self._grace_expired)

    def _grace_expired(self) -> None:
        if self.listener is None:
            self.abort()

    def abort(self) -> None:
        """Stop the generation at once (the reader left or pressed Stop)."""
        if self.task is not None:
            self.task.cancel()

    def shut_down(self) -> None:
        """End with an error frame and the end frame: the server is stopping."""
        self.stop_failure = SHUTTING_DOWN
        self.abort()


class StreamRegistry:
    """Every stream the Application holds, by id: running ones count against `max_streams`;
    finished ones stay for the resume grace when a reader may still come back for their end."""

    def __init__(self, backend: Backend, conversations: ConversationStore, *, max_streams: int,
                 resume_grace: float, resume_buffer: int):
        self.backend = backend
        self.conversations = conversations
        self.max_streams = max_streams
        self.resume_grace = resume_grace
        self.resume_buffer = resume_buffer
        self.streams: dict[str, Stream] = {}
        self.running = 0
        self.draining = False
        self.on_start: list[Callable[[Stream], None]] = []
        self.on_finish: list[Callable[[Stream], None]] = []

    @property
    def full(self) -> bool:
        return self.running >= self.max_streams

    def start(self, conversation: Conversation, question: str, restarted: bool,
              client: str = "") -> Stream:
        stream = Stream(self, conversation, question)
        stream.client = client
        self.streams[stream.id] = stream
        self.running += 1
        stream.task = asyncio.ensure_future(
            stream.run(self.backend, conversation.messages(question), restarted))
        # A done callback, not a `finally`: a task cancelled before its first step never runs its
        # coroutine, and its slot must be released all the same.
        stream.task.add_done_callback(lambda _: self._finished(stream))
        for callback in self.on_start:
            callback(stream)
        return stream

    def get(self, stream_id: str) -> Stream | None:
        return self.streams.get(stream_id)

    def _finished(self, stream: Stream) -> None:
        self.running -= 1
        stream.finished_at = asyncio.get_running_loop().time()
        if stream.answer or stream.outcome == "done":  # keep the turn, cut off or not
            self.conversations.record(stream.conversation, Turn(
                stream.question, "".join(stream.answer), cut_off=stream.outcome != "done"))
        if stream.listener is None and stream.frames is not None and stream.done:
            # nobody has read the end yet: keep it for a returning reader
            asyncio.get_running_loop().call_later(self.resume_grace, self.streams.pop, stream.id, None)
        else:
            self.streams.pop(stream.id, None)
        for callback in self.on_finish:
            callback(stream)

    def shut_down_all(self) -> None:
        for stream in list(self.streams.values()):
            if not stream.done:
                stream.shut_down()
