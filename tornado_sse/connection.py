"""One upstream HTTP/1.1 connection (an asyncio Protocol) and the answer read on it (Exchange).

A read is one call into llhttp (through `httptools`, the C parser uvicorn uses), which handles the
status line, headers, chunked / Content-Length / until-close framing and keep-alive. The body is
either pulled (`Exchange.chunks()`: an async iterator, for httpx and error answers) or pushed
(`Exchange.pump(sink)`): each read's body goes to the sink from `data_received` itself, with no
future, task wake-up or event-loop turn per read. Streams relay tokens that way (backend.py): about
4 of a token's 46 us of server CPU (issue 12).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

import httptools
import httpx2

if TYPE_CHECKING:
    from .transport import FastTransport, Key

HIGH_WATER = 256 * 1024  # stop reading the upstream socket above this: backpressure, bounded memory
MAX_HEAD = 65536  # bytes of status line and headers we accept


class Sink(Protocol):
    """Where a pumped body goes."""

    # One read's body. A future: the reader downstream is congested, stop reading until it is done.
    def feed(self, piece: bytes) -> asyncio.Future[None] | None: ...

    @property
    def satisfied(self) -> bool: ...  # it has read all it wants (its protocol's end event)


class _ClosedBeforeAnswer(httpx2.RemoteProtocolError):
    """The connection closed before a single byte of the response: the request may be resent."""


class _Connection(asyncio.Protocol):
    """One upstream connection; llhttp's callbacks (`on_*`) fill in the response being read."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.paused = False
        self.busy = False  # a request is in flight: bytes belong to its response
        self.stray = False  # bytes arrived while idle: the connection cannot be trusted again
        self._waiter: asyncio.Future[None] | None = None
        self._begin()

    def _begin(self) -> None:
        self.received = 0  # response bytes seen, informational answers included
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.until_close = False  # no Content-Length and not chunked: the body ends at EOF
        self.complete = False
        self.keep_alive = False
        self.error: httpx2.RemoteProtocolError | None = None
        self.body = bytearray()
        self.sink: Sink | None = None  # push mode: the body goes there as it arrives
        self.pumped: asyncio.Future[None] | None = None  # done when the sink has it all
        self.blocked: asyncio.Future[None] | None = None  # the congested reader's: reading paused

    def start(self) -> None:
        """A request is about to be written on this connection."""
        self._begin()
        self.busy = True

    # -- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete or self.error is not None:
            self.stray = True  # nothing may follow a response we did not ask for
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx2.RemoteProtocolError(f"malformed response from the upstream: {exc}")
        if not self.head_done and self.received > MAX_HEAD and self.error is None:
            self.error = httpx2.RemoteProtocolError("response headers too large")
        if len(self.body) > HIGH_WATER and not self.paused and self.pumped is None:
            self._pause()  # pulled: _more resumes; pushed, the body is taken at once
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self.pumped is not None:
            self._push()
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _pause(self) -> None:
        if self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    # -- llhttp's callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:
            self.stray = True  # a second response to one request

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # after the head, llhttp reports a chunked body's trailers here
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # 100 Continue, 103 Early Hints: interim answers, the real one follows (RFC 9110,
            # 15.2); llhttp parses each as a message of its own and then expects the next.
            self.headers = []
            return
        self.status, self.head_done = status, True
        names = {name.lower() for name, _ in self.headers}
        self.until_close = b"content-length" not in names and b"transfer-encoding" not in names

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()

    # -- reading ---------------------------------------------------------------------------------
    def _failed(self) -> None:
        """Raise if the answer can no longer be read: a parse error, or a closed connection."""
        if self.error is not None:
            raise self.error
        if self.closed:
            if not self.received:
                raise _ClosedBeforeAnswer("the upstream closed the connection before answering")
            raise httpx2.RemoteProtocolError("the upstream closed the connection mid-response")

    async def _more(self) -> None:
        """Wait for more bytes; a closed connection with nothing new is an error."""
        self._failed()
        self._resume()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The final status and headers (interim 1xx answers skipped)."""
        while not self.head_done:
            await self._more()
        return self.status, self.headers

    def take(self) -> tuple[bytes, bool]:
        """The body decoded so far (from its framing) and whether that is all of it. Raises once
        nothing is left to take from a failed answer."""
        piece = b""
        if self.body:
            piece = bytes(self.body)
            self.body.clear()
        if self.complete:
            return piece, True
        if self.closed and self.until_close and self.error is None:
            self.complete = True  # the only end such a body has
            return piece, True
        if not piece:
            self._failed()
        return piece, False

    async def read_body(self) -> AsyncIterator[bytes]:
        """Pull: the body, each piece what the last reads completed."""
        while True:
            piece, ended = self.take()
            if piece:
                yield piece  # then take() again: the end may have come while the reader was busy
                del piece  # not held while the stream waits for its next token
            elif ended:
                return
            else:
                await self._more()

    def pump(self, sink: Sink) -> asyncio.Future[None]:
        """Push: the body goes to `sink` as it arrives, until it is satisfied or the body ends
        (the future's result), or the answer fails (its exception, the sink's own included)."""
        self.sink = sink
        self.pumped = asyncio.get_running_loop().create_future()
        done = self.pumped
        self._resume()  # a large read may have paused it while the head was read
        self._push()
        return done

    def _push(self) -> None:
        done, sink = self.pumped, self.sink
        if done is None or sink is None or self.blocked is not None:
            return
        try:
            while not done.done():
                piece, ended = self.take()
                if piece:
                    ready = sink.feed(piece)
                    ended = ended or sink.satisfied
                    if ready is not None and not ended:
                        # Backpressure: the upstream waits in its socket, not in our memory.
                        self.blocked = ready
                        self._pause()
                        ready.add_done_callback(self._unblock)
                        return
                if ended:
                    self._unpump()
                    if not done.done():  # a write in feed() may have lost the reader: cancelled
                        done.set_result(None)
                if not piece:
                    return
        except Exception as exc:  # noqa: BLE001 - the reader sees it as it would a pulled read's
            self._unpump()
            if not done.done():
                done.set_exception(exc)

    def _unblock(self, ready: asyncio.Future[None]) -> None:
        if ready is not self.blocked:
            return  # a pump that is over (the connection may serve another request by now)
        self.blocked = None
        if self.pumped is not None:
            self._resume()
            self._push()

    def _unpump(self) -> None:
        """Back to pull mode: what follows (the body's end) is read with read_body."""
        self.sink = self.pumped = self.blocked = None

    def close(self) -> None:
        self.closed = True
        self._unpump()
        if self.transport is not None:
            self.transport.close()


class Exchange:
    """One request's answer: its final status and headers, then its body. Closing it early closes
    the socket (the upstream stops generating); read to the end, the connection goes back to the
    pool."""

    __slots__ = ("status", "headers", "_pool", "_key", "_conn", "_reusable")

    def __init__(self, pool: FastTransport, key: Key, conn: _Connection, status: int,
                 headers: list[tuple[bytes, bytes]], reusable: bool):
        self.status, self.headers = status, headers
        self._pool, self._key, self._conn, self._reusable = pool, key, conn, reusable

    @property
    def ended(self) -> bool:
        """The whole body has arrived (the last of it may still be unread)."""
        return self._conn.complete

    def chunks(self) -> AsyncIterator[bytes]:
        return self._conn.read_body()

    def pump(self, sink: Sink) -> asyncio.Future[None]:
        return self._conn.pump(sink)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self._conn.read_body()])

    async def aclose(self) -> None:
        conn = self._conn
        if self._reusable and conn.complete and conn.keep_alive and not conn.closed and not conn.stray:
            conn.busy = False
            conn._unpump()
            self._pool.release(self._key, conn)
        else:
            conn.close()
