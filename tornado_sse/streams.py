"""One generation per question: the relay task that asks the backend, the frames it delivers,
numbered, to the connection that currently reads them (the registry that holds them all:
registry.py).

A stream outlives its connection only when `--resume-grace` allows: then a browser that comes back
with `Last-Event-ID` gets the frames it missed from a bounded buffer and follows live, and no second
upstream request is ever made. Otherwise a lost connection aborts the generation at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from collections import deque
from typing import TYPE_CHECKING, Protocol

from . import sse
from .backend import Backend, Finish, Message
from .conversations import Conversation
from .errors import Failure, cause_chain, describe, without_keys

if TYPE_CHECKING:
    from .registry import StreamRegistry

log = logging.getLogger(__name__)

STOPPED = json.dumps({"reason": "stopped"})
SHUTTING_DOWN = Failure("server_shutdown", "The server is restarting. Please ask again in a moment.")


class Listener(Protocol):
    """The connection reading a stream (eventsocket.EventSocket)."""

    # One frame, or several written at once, now. Never raises: a failed write detaches it. A
    # future: the socket is congested; done once the frames are out or the reader is given up.
    def push(self, frames: bytes) -> asyncio.Future[None] | None: ...

    def end(self, last: bytes) -> None: ...  # the last frames: write them, finish the response

    def drop(self) -> None: ...  # another connection took over: close this one


class Stream:
    def __init__(self, registry: StreamRegistry, conversation: Conversation, question: str,
                 owner: str = ""):
        self.id = secrets.token_urlsafe(12)
        # The id is a capability (it resumes and stops the stream): logs get a short hash of it.
        self.log_id = log_id(self.id)
        self.owner = owner  # the browser that asked (BaseHandler.owner); only it may resume or stop
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
        self.stopped = False  # the reader pressed Stop
        self.phase = "start"  # "relay" while the upstream is read, "end" for the last frames
        self.client = ""
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        self.first_token_at: float | None = None
        self.first_chunk_at: float | None = None  # the first text of any kind, thinking included
        self.finish: Finish | None = None  # how the upstream said it ended, with its usage
        self.finished_at = self.started_at
        self.task: asyncio.Task[None] | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        # With a shared store, every frame is also queued for other instances (never awaited).
        self.share = registry.store.share if registry.store.shares_frames else None
        self.recorded = False  # the turn is kept already (a shared store keeps it before the end)

    # -- the relay: backend deltas -> numbered frames -> the listener --------------------------

    def open(self, restarted: bool) -> bytes:
        """The first frame, `meta`: the ids the page keeps. Numbered before the relay starts, so
        /ask writes it with the response head, in one send()."""
        meta = {"conversation": self.conversation.id, "stream": self.id, "restarted": restarted}
        return self.number("meta", json.dumps(meta))

    async def run(self, backend: Backend, messages: list[Message]) -> None:
        failure: Failure | None = None
        try:
            self.phase = "relay"
            if self.stopped:  # Stop came before the relay's first step
                raise asyncio.CancelledError
            self.finish = await backend.relay(messages, self.deliver)
        except asyncio.CancelledError:
            if self.stop_failure is None and not self.stopped:
                raise  # the reader left
            failure = self.stop_failure
        except Exception as exc:
            failure = describe(exc)
            self.error = exc
            log.warning("stream %s failed (%s): %s", self.log_id, failure.code,
                        without_keys(cause_chain(exc)), exc_info=failure.code == "internal_error")
        finally:
            self.phase = "end"  # Stop cancels no more: the last frames must go out
        if failure is not None:
            self.outcome = failure.code
            last = self.number("error", json.dumps({"code": failure.code, "message": failure.message}))
        elif self.stopped:
            self.outcome = "stopped"
            last = self.number("finish", STOPPED)
        else:
            self.outcome = "done"
            last = self.number("finish", finish_data(self.finish or Finish("stop")))
        if self.registry.store.shared:
            # Before the end frame: a follow-up sent the moment it arrives may reach another
            # instance, which must already see this turn.
            await self.send(last)
            last = b""
            await self.registry.keep_turn(self)
        # The last frames and the response's end in one write: each send() to a loopback socket
        # also runs the reader's side of TCP (~2% of burst2000's CPU a send).
        last += self.number("update", sse.END_MARKER)
        self.done = True
        listener, self.listener = self.listener, None  # not kept (nor its socket) for the grace
        if listener is not None:
            listener.end(last)

    def deliver(self, event: str, text: str) -> asyncio.Future[None] | None:
        """A delta from the backend, as it arrives (backend.Deliver): its frame to the reader now.
        The backend calls this from the upstream socket's callback, outside this task."""
        if event == "update":
            if not self.answer:
                self.first_token_at = asyncio.get_running_loop().time()
                self.first_chunk_at = self.first_chunk_at or self.first_token_at
            self.answer.append(text)
            if text == sse.END_MARKER:
                ready = None
                for part in sse.update_parts(text):
                    ready = self.push(self.number(event, part)) or ready
                return ready
        elif self.first_chunk_at is None:
            self.first_chunk_at = asyncio.get_running_loop().time()
        return self.push(self.number(event, text))

    def number(self, event: str, data: str) -> bytes:
        """The next frame, numbered (and padded), kept for a returning reader and shared."""
        self.seq += 1
        frame = sse.encode_event(event, data, f"{self.id}.{self.seq}")
        if self.registry.pad_frames:
            frame = sse.pad(frame, self.registry.pad_step())
        if self.frames is not None:
            self.frames.append(frame)
        if self.share is not None:
            self.share(self, frame)
        return frame

    def push(self, frames: bytes) -> asyncio.Future[None] | None:
        """To the reader, if there is one now: one frame, or several written at once."""
        listener = self.listener
        return listener.push(frames) if listener is not None else None

    async def send(self, frames: bytes) -> None:
        ready = self.push(frames)
        if ready is not None:
            await ready

    def task_done(self, task: asyncio.Task[None]) -> None:
        """The relay task's done callback (a bound method: a closure is ~0.2 kB a held stream)."""
        self.registry.finished(self)

    # -- who reads it ----------------------------------------------------------------------------

    def backlog(self, after: int) -> list[bytes] | None:
        """The frames after seq `after`, to replay to a reader that comes back; None when they are
        no longer buffered (the caller says the answer was cut off)."""
        frames = self.frames
        if frames is None or after + 1 < self.seq - len(frames) + 1 or after > self.seq:
            return None
        return list(frames)[len(frames) - (self.seq - after):] if after < self.seq else []

    def attach(self, listener: Listener) -> None:
        """`listener` reads from now on; the one before it, if any, is dropped."""
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        old, self.listener = self.listener, None  # no longer ours: dropping it arms no grace
        if old is not None and old is not listener:
            old.drop()
        self.listener = None if self.done else listener

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

    def stop(self) -> None:
        """The reader pressed Stop: abort the generation, then end with `finish` "stopped" and the
        end frame, so the response finishes instead of idling with pings."""
        if self.phase == "end" or self.stopped:
            return
        self.stopped = True
        if self.phase == "relay":  # before it, run() sees `stopped` and never opens the upstream
            self.abort()

    def shut_down(self) -> None:
        """End with an error frame and the end frame: the server is stopping."""
        self.stop_failure = SHUTTING_DOWN
        self.abort()


def finish_data(finish: Finish) -> str:
    """The `finish` event's data: {"reason": ...}, and "usage" when the upstream counted it."""
    data: dict[str, object] = {"reason": finish.reason}
    if finish.usage is not None:
        data["usage"] = {"input_tokens": finish.usage.input_tokens,
                         "output_tokens": finish.usage.output_tokens}
    return json.dumps(data)


def log_id(id: str) -> str:
    """An id as logs show it: enough to match lines up, useless to resume or stop anything."""
    return hashlib.sha256(id.encode()).hexdigest()[:12]
