"""A lean HTTP/1.1 keep-alive transport for the upstream, under the `openai` SDK's httpx client.

The SDK keeps doing what it does well (auth, base URL, retries, typed errors); this only moves the
bytes. httpx's default stack (httpcore, h11, anyio) costs more than everything else on the
per-token path, and its pool scans every open connection whenever a request starts or ends, which
grows with the number of concurrent streams. Here a connection is an asyncio Protocol: a read is
one call into llhttp (connection.py); the pool is a per-host stack of idle connections.

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

import httpx2

from .connection import Exchange, _ClosedBeforeAnswer, _Connection

log = logging.getLogger(__name__)

MAX_IDLE_PER_HOST = 256
Key = tuple[str, str, int]  # scheme, host, port: one pool of idle connections each


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
