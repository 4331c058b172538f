"""/ask, the SSE endpoint: one answer as Server-Sent Events, always ending with the end frame.

    browser -> AskHandler -> StreamRegistry.start -> Stream.run: backend.stream(messages)
            <- AskHandler.send(frame) <- Stream.emit: sse.encode_event(...)
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any, cast

from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError

from . import sse
from .guard import Gate
from .handlers import BaseHandler, ClientError
from .metrics import Metrics
from .settings import Settings
from .store import STORE_DOWN, RemoteStream, StoreError
from .streams import Stream, StreamRegistry

# C0 controls other than tab, LF and CR: nothing a person types, and NUL breaks some upstreams.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class AskHandler(BaseHandler):
    """GET /ask: one answer as Server-Sent Events; it always ends with the end frame.

    The generation runs in its Stream's own task; this handler is only its current reader. When
    the browser leaves, `on_connection_close` detaches it, which aborts the generation (at once,
    or after `--resume-grace`), closing the upstream response.
    """

    def initialize(self, settings: Settings, gate: Gate,  # type: ignore[override]
                   registry: StreamRegistry, metrics: Metrics, pinger: Pinger) -> None:
        super().initialize(settings, gate)
        self.registry = registry
        self.pinger = pinger
        self.metrics = metrics
        self.stream: Stream | None = None
        self.remote: RemoteStream | None = None  # a stream another instance produces (Redis)
        self.relay: asyncio.Task[None] | None = None
        self.socket: IOStream | None = None
        self.over = False  # the stream ended or the reader left: no more pings
        self.active = False  # a frame went out since the keep-alive last looked
        self.streaming = False  # the response headers are out
        self.chunked = True  # the body is chunked (HTTP/1.1), or ends with the close (HTTP/1.0)

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
        try:
            if not store.up:
                raise StoreError(STORE_DOWN)
            wait = await store.take(self.client)
            if wait:
                raise ClientError(429, "rate_limited", "Too many questions from your address. Please "
                                  f"wait {math.ceil(wait)} s.", {"Retry-After": str(math.ceil(wait))})
            owner = self.owner()
            conversation, restarted = await store.open(self.query("conversation"), owner)
        except StoreError as exc:
            raise ClientError(503, exc.failure.code, exc.failure.message, {"Retry-After": "5"}) from None
        self.start_event_stream()
        self.stream = self.registry.start(conversation, question, restarted, self.client, owner)
        self.stream.attach(self)
        self.follow()

    async def resume(self, last_event_id: str) -> None:
        parsed = sse.parse_event_id(last_event_id)
        # Another browser's stream is unknown: an id alone must not replay it or cut its reader off.
        stream = self.registry.get(parsed[0], self.owner()) if parsed else None
        if stream is None and parsed and self.registry.store.shares_frames:
            remote = await self.registry.store.find(parsed[0], self.owner())
            if remote is not None:  # another instance produces it: follow it through the store
                await self.resume_remote(remote, parsed[1])
                return
        backlog = stream.attach(self, after=parsed[1]) if stream and parsed else None
        if stream is None or backlog is None or (stream.done and not backlog):
            # Nothing left to send: unknown, no longer buffered, or read to its end. 204 is the
            # SSE spec's "stop reconnecting" (WHATWG HTML 9.2.3); an error frame would only be
            # followed by another reconnect from a client that never closes its EventSource.
            self.set_status(204)
            self.finish()
            return
        self.start_event_stream()
        self.stream = stream
        self.write(b"".join(backlog))
        if stream.done:
            self.finish_stream()
            return
        self.streaming = True
        self.flush()
        self.forget_head()
        self.follow()

    async def resume_remote(self, remote: RemoteStream, after: int) -> None:
        backlog = await remote.backlog(after)
        if backlog is None or (remote.ended and not backlog):  # as resume(): nothing left to send
            self.set_status(204)
            self.finish()
            return
        self.start_event_stream()
        self.write(b"".join(backlog))
        if remote.ended:
            self.finish_stream()
            return
        self.streaming = True
        self.flush()
        self.forget_head()
        self.remote = remote
        self.relay = asyncio.ensure_future(self.relay_remote(remote))
        self.follow()

    async def relay_remote(self, remote: RemoteStream) -> None:
        """Frames from the store as its producer writes them. When the producer dies or the store
        goes away, the reader still gets an error frame and the end frame, numbered on."""
        try:
            async for frames in remote.live():
                for frame in frames:
                    await self.send(frame)
        except StoreError as exc:
            failure = exc.failure
            error = json.dumps({"code": failure.code, "message": failure.message})
            for seq, (event, data) in enumerate([("error", error), ("update", sse.END_MARKER)], 1):
                await self.send(self.registry.frame(event, data, f"{remote.id}.{remote.last + seq}"))
        self.end()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.metrics.rejected.labels(exc.code if isinstance(exc, ClientError) else str(status_code)).inc()
        super().write_error(status_code, **kwargs)

    def start_event_stream(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self.chunked = self.request.version == "HTTP/1.1"  # Tornado's own rule (_chunking_output)
        if not self.chunked:
            # An HTTP/1.0 body has no framing: only the close ends it. Tornado would echo a 1.0
            # "Connection: keep-alive" and keep the socket open after the end frame (it reads the
            # header in HTTP1Connection.write_headers), so the client would wait forever.
            self.request.headers.pop("Connection", None)
            self.set_header("Connection", "close")
        self.socket = cast(HTTP1Connection, self.request.connection).stream

    def forget_head(self) -> None:
        """The response head is out (RequestHandler.flush reads these only until then): its
        headers, the owner cookie's Morsel and the request's parsed cookies need not live as long
        as the stream (~1.3 kB a held stream)."""
        self._headers = httputil.HTTPHeaders()
        self.__dict__.pop("_new_cookie", None)
        self.request.__dict__.pop("_cookies", None)  # HTTPServerRequest.cookies' cache

    def follow(self) -> None:
        """From now on the stream writes to us and the Pinger pings while it is silent; get()
        returns at once. With _auto_finish off, Tornado's _execute leaves the response open
        (web.py: `if self._auto_finish and not self._finished: self.finish()`), and its task,
        our coroutines and a Future to wait on no longer live as long as the stream (~2.5 KiB a
        held stream in hold5000); end() or lost() finishes the response."""
        self._auto_finish = False
        if not self.over:
            self.pinger.add(self)

    def keepalive(self) -> None:
        """The Pinger's look, every --keepalive seconds: a ping if nothing went out since the last."""
        if self.active:
            self.active = False
        elif self.streaming and not self._finished:
            self.write_chunk(sse.PING)

    # -- Listener: what the Stream calls ---------------------------------------------------------

    async def send(self, frame: bytes) -> None:
        """Write a frame now. Only a congested socket makes us wait, at most --send-timeout."""
        socket = self.socket
        assert socket is not None
        self.active = True
        written: asyncio.Future[None] | None
        if not self.streaming:  # the first frame goes out with the response headers
            self.streaming = True
            self.write(frame)
            written = self.flush()
            self.forget_head()
        else:
            written = self.write_chunk(frame)
        if written is not None and socket.writing():  # the kernel buffer is full: a slow reader
            try:
                await asyncio.wait_for(written, self.config.send_timeout)
            except (StreamClosedError, TimeoutError):
                self.lost()

    def write_chunk(self, frame: bytes) -> asyncio.Future[None] | None:
        """One frame as a chunk of the chunked response (bare on HTTP/1.0), straight to the socket
        when nothing is queued.

        The per-token path: one send() call, no futures or callbacks, which is most of what
        RequestHandler.flush would cost. Whatever the kernel does not take, and anything on TLS,
        goes through the IOStream, which keeps the order.
        """
        socket = self.socket
        assert socket is not None
        if socket.closed():
            self.lost()
            return None
        data = b"%x\r\n%b\r\n" % (len(frame), frame) if self.chunked else frame
        if not socket.writing() and not isinstance(socket, SSLIOStream):
            try:
                sent = socket.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.lost()
                return None
            if sent == len(data):
                return None
            data = data[sent:]
        return socket.write(data)

    def end(self) -> None:
        self.finish_stream()
        self._resolve()

    def finish_stream(self) -> None:
        """Finish the event stream; on HTTP/1.0, close the connection once the last byte is out."""
        if self._finished:
            return
        written = self.finish()
        socket = self.socket
        if not self.chunked and socket is not None:
            written.add_done_callback(lambda _: socket.close())

    def drop(self) -> None:
        self.lost()

    def lost(self) -> None:
        """Gone or too slow: let the stream go on without us (or abort), close the socket."""
        if self.stream is not None:
            self.stream.detach(self)
        if self.remote is not None:
            self.remote.detach()
            if self.relay is not None and self.relay is not asyncio.current_task():
                self.relay.cancel()
        if self.socket is not None and not self.socket.closed():
            self.socket.close()
        self._resolve()

    def on_connection_close(self) -> None:
        self.lost()

    def _resolve(self) -> None:
        self.over = True
        self.pinger.discard(self)

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


class Pinger:
    """One timer for every open stream instead of a keep-alive task each (a task and its
    coroutine are ~1.5 kB a stream, and thousands of timers to re-arm): every `interval` seconds
    it asks each stream being followed to ping if it has been silent since the last look. A
    silent stream still gets its first ping between one and two intervals after its last frame."""

    def __init__(self, interval: float):
        self.interval = interval
        self.handlers: dict[AskHandler, None] = {}  # ordered: pings go out in arrival order
        self._timer: asyncio.TimerHandle | None = None

    def add(self, handler: AskHandler) -> None:
        self.handlers[handler] = None
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def discard(self, handler: AskHandler) -> None:
        self.handlers.pop(handler, None)

    def _tick(self) -> None:
        self._timer = None
        for handler in list(self.handlers):
            handler.keepalive()
        if self.handlers:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)
