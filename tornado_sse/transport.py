"""A lean HTTP/1.1 keep-alive transport for the upstream, under the `openai` SDK's httpx client.

The SDK keeps doing what it does well (auth, base URL, retries, typed errors); this only moves the
bytes. httpx's default stack (httpcore, h11, anyio) costs more than everything else on the
per-token path, and its pool scans every open connection whenever a request starts or ends, which
grows with the number of concurrent streams. Here a connection is an asyncio Protocol: a read is
one call into llhttp (through `httptools`, the C parser uvicorn uses), which handles the status
line, headers, chunked / Content-Length / until-close framing and keep-alive; the pool is a
per-host stack of idle connections.

It raises httpx's own exception types, so the SDK's retry and error mapping see what they expect.
Not supported: proxies and HTTP/2 (a proxied upstream goes through the aiohttp client instead:
see `upstream.py`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import AsyncIterator

import httptools
import httpx2

log = logging.getLogger(__name__)

HIGH_WATER = 256 * 1024  # stop reading the upstream socket above this: backpressure, bounded memory
MAX_HEAD = 65536  # bytes of status line and headers we accept
MAX_IDLE_PER_HOST = 256
Key = tuple[str, str, int]  # scheme, host, port: one pool of idle connections each


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
        if len(self.body) > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

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
    async def _more(self) -> None:
        """Wait for more bytes; a closed connection with nothing new is an error."""
        if self.error is not None:
            raise self.error
        if self.closed:
            if not self.received:
                raise _ClosedBeforeAnswer("the upstream closed the connection before answering")
            raise httpx2.RemoteProtocolError("the upstream closed the connection mid-response")
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
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

    async def read_body(self) -> AsyncIterator[bytes]:
        """The body, decoded from its framing; each piece is what the last reads completed."""
        while True:
            if self.body:
                piece = bytes(self.body)
                self.body.clear()
                yield piece
                del piece  # not held while the stream waits for its next token
            if self.complete:
                return
            if self.closed and self.until_close and self.error is None:
                self.complete = True  # the only end such a body has
                return
            await self._more()

    def close(self) -> None:
        self.closed = True
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

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self._conn.read_body()])

    async def aclose(self) -> None:
        conn = self._conn
        if self._reusable and conn.complete and conn.keep_alive and not conn.closed and not conn.stray:
            conn.busy = False
            self._pool.release(self._key, conn)
        else:
            conn.close()


class _Body(httpx2.AsyncByteStream):
    """An Exchange's body as httpx reads it."""

    def __init__(self, exchange: Exchange):
        self._exchange = exchange

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._exchange.chunks():
            yield chunk

    async def aclose(self) -> None:
        await self._exchange.aclose()


class FastTransport(httpx2.AsyncBaseTransport):
    def __init__(self, *, connect_timeout: float, ssl_context: ssl.SSLContext | None = None):
        self._connect_timeout = connect_timeout
        self._ssl_context = ssl_context
        self._idle: dict[Key, list[_Connection]] = {}

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        message = self._head(request) + await request.aread()
        # A HEAD answer has no body, but llhttp cannot be told so: such a connection is not reused.
        exchange = await self.exchange(key_of(request.url), message, reusable=request.method != "HEAD")
        return httpx2.Response(exchange.status, headers=exchange.headers, stream=_Body(exchange),
                               extensions={"http_version": b"HTTP/1.1"})

    async def exchange(self, key: Key, message: bytes, reusable: bool = True) -> Exchange:
        """Write one whole request (`message`: head and body) and read the answer's head."""
        conn = self._idle_connection(key)
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect(key)
            assert conn.transport is not None
            conn.start()
            conn.transport.write(message)
            try:
                status, headers = await conn.read_head()
                break
            except _ClosedBeforeAnswer:
                conn.close()
                if not reused:
                    raise
                # A kept-alive connection the upstream had closed, seen only once the request was
                # on it. Resend once, on a new connection: never on another idle one, which may
                # be just as stale (httpcore does not resend at all once a request is written).
                log.info("the upstream closed an idle keep-alive connection on %s:%d before "
                         "answering; sending the request again on a new connection", key[1], key[2])
                conn, reused = None, False
            except BaseException:
                conn.close()  # cancelled while waiting: the upstream must see the close at once
                raise
        if not reusable:
            conn.complete = True
        conn.headers = []  # the Exchange has them; the connection outlives it in the pool
        return Exchange(self, key, conn, status, headers, reusable)

    @staticmethod
    def _head(request: httpx2.Request) -> bytes:
        target = request.url.raw_path
        lines = [request.method.encode() + b" " + target + b" HTTP/1.1"]
        names = set()
        for name, value in request.headers.raw:
            names.add(name.lower())
            lines.append(name + b": " + value)
        if b"host" not in names:
            lines.insert(1, b"Host: " + request.url.netloc)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _idle_connection(self, key: Key) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.stray:
                return conn
            conn.close()
        return None

    def release(self, key: Key, conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < MAX_IDLE_PER_HOST:
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, key: Key) -> _Connection:
        scheme, host, port = key
        tls = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = httpx2.create_ssl_context()  # the system's trust store
            tls = self._ssl_context
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection, host, port, ssl=tls, server_hostname=host if tls else None)
        except TimeoutError:
            raise httpx2.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpx2.ConnectError(f"cannot connect to {host}:{port}: {_reason(exc)}") from exc
        return conn

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def key_of(url: httpx2.URL) -> Key:
    return (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))


def _reason(exc: OSError) -> str:
    """`Connection refused` rather than asyncio's `Connect call failed (address)`; an SSL error's
    own text (its errno is OpenSSL's, not the system's); a resolver error as it is."""
    if isinstance(exc, ssl.SSLError) or not exc.errno or exc.errno < 0:
        return str(exc)
    return os.strerror(exc.errno)
