"""/ask, the SSE endpoint: one answer as Server-Sent Events, always ending with the end frame.

    browser -> AskHandler -> StreamRegistry.start -> Stream.run: backend.relay(messages, deliver)
            <- EventSocket.push(frame) <- Stream.deliver: sse.encode_event(...) <- upstream read
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import time
from typing import Any, cast

from tornado.http1connection import HTTP1Connection

from . import sse
from .eventsocket import EventSocket, Pinger
from .guard import Gate
from .handlers import BaseHandler, ClientError
from .logs import log_access
from .metrics import Metrics
from .server import EdgeServer
from .settings import Settings
from .store import STORE_DOWN, RemoteStream, StoreError
from .registry import StreamRegistry

# C0 controls other than tab, LF and CR: nothing a person types, and NUL breaks some upstreams.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class AskHandler(BaseHandler):
    """GET /ask: one answer as Server-Sent Events; it always ends with the end frame.

    The generation runs in its Stream's own task. This handler checks the request, writes the
    response head and hands the connection to an EventSocket, the stream's reader from then on;
    get() returns, and Tornado's request, handler and connection objects are gone while the
    stream is held. When the browser leaves, the EventSocket detaches from the stream, which
    aborts the generation (at once, or after `--resume-grace`), closing the upstream response.
    """

    def initialize(self, settings: Settings, gate: Gate,  # type: ignore[override]
                   registry: StreamRegistry, metrics: Metrics, pinger: Pinger) -> None:
        super().initialize(settings, gate)
        self.registry = registry
        self.pinger = pinger
        self.metrics = metrics

    async def get(self) -> None:
        self.check_access()
        last_event_id = self.request.headers.get("Last-Event-ID")
        if last_event_id is None:
            last_event_id = self.query("resume")
        if last_event_id is not None:  # even empty: a reconnect is never a new question
            await self.resume(last_event_id)  # a reconnect never starts a second generation
            return
        question = self.question()
        if self.registry.draining:
            raise ClientError(503, "shutting_down", "The server is restarting. Please ask again "
                              "in a moment.", {"Retry-After": "5"})
        if self.registry.full:
            raise ClientError(503, "busy", "The server is answering as many questions as it can. "
                              "Please try again shortly.", {"Retry-After": "5"})
        store = self.registry.store
        if not store.up:
            raise ClientError.unavailable(STORE_DOWN)
        try:
            wait = await store.take(self.client)
            if wait:
                raise ClientError(429, "rate_limited", "Too many questions from your address. Please "
                                  f"wait {math.ceil(wait)} s.", {"Retry-After": str(math.ceil(wait))})
            owner = self.owner()
            conversation, restarted = await store.open(self.query("conversation"), owner)
        except StoreError as exc:
            raise ClientError.unavailable(exc.failure) from None
        stream, first = self.registry.start(conversation, question, restarted, self.client, owner)
        self.start_event_stream()
        self.write(first)  # with the response head, in one send()
        socket = self.hand_over()
        if socket is None:  # the browser left while we waited: nobody can come back for it
            stream.abort()
            return
        socket.stream = stream
        stream.attach(socket)

    async def resume(self, last_event_id: str) -> None:
        parsed = sse.parse_event_id(last_event_id)
        owner = self.owner()
        # Another browser's stream is unknown: an id alone must not replay it or cut its reader off.
        stream = self.registry.get(parsed[0], owner) if parsed else None
        if stream is None and parsed and self.registry.store.shares_frames:
            remote = await self.registry.store.find(parsed[0], owner)
            if remote is not None:  # another instance produces it: follow it through the store
                await self.resume_remote(remote, parsed[1])
                return
        backlog = stream.backlog(parsed[1]) if stream and parsed else None
        socket = self.replay(backlog, stream is None or stream.done)
        if socket is not None and stream is not None:
            socket.stream = stream
            stream.attach(socket)  # drops the reader before us, if any

    async def resume_remote(self, remote: RemoteStream, after: int) -> None:
        backlog = await remote.backlog(after)
        socket = self.replay(backlog, remote.ended)
        if socket is None:
            if backlog is not None and not remote.ended:  # the browser left before following
                remote.detach()
            return
        socket.remote = remote
        socket.relay = asyncio.ensure_future(relay_remote(socket, remote, self.registry))

    def replay(self, backlog: list[bytes] | None, ended: bool) -> EventSocket | None:
        """The frames a reconnect missed; the socket to follow the rest on, or None when there is
        nothing to follow: the backlog was the rest, or there is nothing left to send at all
        (unknown, no longer buffered, or read to its end), which gets 204, the SSE spec's "stop
        reconnecting" (WHATWG HTML 9.2.3): an error frame would only be followed by another
        reconnect from a client that never closes its EventSource."""
        if backlog is None or (ended and not backlog):
            self.set_status(204)
            self.finish()
            return None
        self.start_event_stream()
        self.write(b"".join(backlog))
        if ended:  # the rest of an answer already written: an ordinary response
            self.finish_event_stream()
            return None
        return self.hand_over()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.metrics.rejected.labels(exc.code if isinstance(exc, ClientError) else str(status_code)).inc()
        super().write_error(status_code, **kwargs)

    def start_event_stream(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        if self.request.version != "HTTP/1.1":  # Tornado's own rule for chunking (_chunking_output)
            # An HTTP/1.0 body has no framing: only the close ends it. Tornado would echo a 1.0
            # "Connection: keep-alive" and keep the socket open after the end frame (it reads the
            # header in HTTP1Connection.write_headers), so the client would wait forever.
            self.request.headers.pop("Connection", None)
            self.set_header("Connection", "close")

    def finish_event_stream(self) -> None:
        """An event stream written whole; on HTTP/1.0, whose body only the close ends, close."""
        io = cast(HTTP1Connection, self.request.connection).stream
        written = self.finish()
        if self.request.version != "HTTP/1.1":
            written.add_done_callback(lambda _: io.close())

    def hand_over(self) -> EventSocket | None:
        """Write the response head (and what was written before it), and give the connection to
        an EventSocket; None when the browser has already gone."""
        self.flush()
        request = self.request
        edge: EdgeServer | None = self.application.settings.get("edge")
        io = edge.hand_over(self) if edge is not None else self.detach()
        if io.closed():
            if edge is not None:
                edge.release(io)
            return None
        chunked = request.version == "HTTP/1.1"
        # Tornado's HTTP1Connection._can_keep_alive for an HTTP/1.1 request, and a server to go
        # back to.
        keep_alive = (chunked and edge is not None
                      and request.headers.get("Connection", "").lower() != "close")
        return EventSocket(io, edge, chunked=chunked, keep_alive=keep_alive,
                           send_timeout=self.config.send_timeout, pinger=self.pinger,
                           log_access=functools.partial(
                               log_access, 200, request.method or "GET", request.path,
                               request.remote_ip, time.time() - request.request_time()))

    def question(self) -> str:
        question = (self.query("question") or "").strip()
        if not question:
            raise ClientError(400, "missing_question", "Ask a question: /ask?question=your+question")
        limit = self.config.max_question_chars
        if len(question) > limit:
            raise ClientError(413, "question_too_long",
                              f"The question is {len(question):,} characters long; "
                              f"this server accepts at most {limit:,}.")
        if _CONTROL_CHARS.search(question):
            raise ClientError(400, "invalid_characters", "The question contains control characters "
                              "(such as NUL) that cannot be sent to the model.")
        return question


async def relay_remote(socket: EventSocket, remote: RemoteStream, registry: StreamRegistry) -> None:
    """Frames from the store as its producer writes them. When the producer dies or the store goes
    away, the reader still gets an error frame and the end frame, numbered on."""
    try:
        async for frames in remote.live():
            for frame in frames:
                await socket.send(frame)
        socket.end(b"")
    except StoreError as exc:
        failure = exc.failure
        error = json.dumps({"code": failure.code, "message": failure.message})
        socket.end(b"".join(registry.frame(event, data, f"{remote.id}.{remote.last + seq}")
                            for seq, (event, data) in enumerate([("error", error),
                                                                 ("update", sse.END_MARKER)], 1)))
