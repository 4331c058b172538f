"""A lean HTTP/1.1 keep-alive transport for the upstream, under the `openai` SDK's httpx client.

The SDK keeps doing what it does well (auth, base URL, retries, typed errors); this only moves the
bytes. httpx's default stack (httpcore, h11, anyio) costs more than everything else on the
per-token path, and its pool scans every open connection whenever a request starts or ends, which
grows with the number of concurrent streams. Here a connection is an asyncio Protocol: a read is a
buffer append and a wake-up, a chunked body is decoded in one pass over what arrived, and the pool
is a per-host stack of idle connections.

It raises httpx's own exception types, so the SDK's retry and error mapping see what they expect.
Not supported: proxies and HTTP/2 (use `--upstream-transport httpx` for those).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import httpx2

HIGH_WATER = 256 * 1024  # stop reading the upstream socket above this: backpressure, bounded memory
MAX_IDLE_PER_HOST = 256


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self.http10 = False
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and not self.paused and self.transport is not None:
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

    # -- reading ---------------------------------------------------------------------------------
    async def _more(self) -> None:
        """Wait for more bytes; a closed connection with nothing new is an error."""
        if self.closed:
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
        """The status and headers; `self.http10` tells an HTTP/1.0 answer (no keep-alive)."""
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buffer) > 65536:
                raise httpx2.RemoteProtocolError("response headers too large")
            await self._more()
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        del self.buffer[: end + 4]
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1.") or not rest[:3].isdigit():
            raise httpx2.RemoteProtocolError(f"malformed status line {lines[0][:80]!r}")
        self.http10 = version == b"HTTP/1.0"
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise httpx2.RemoteProtocolError("malformed header line")
            headers.append((name.strip(), value.strip()))
        return int(rest[:3]), headers

    async def read_exactly(self, remaining: int) -> AsyncIterator[bytes]:
        while remaining:
            if not self.buffer:
                await self._more()
            piece = bytes(self.buffer[:remaining])
            del self.buffer[: len(piece)]
            remaining -= len(piece)
            yield piece

    async def read_chunked(self) -> AsyncIterator[bytes]:
        """Decode `Transfer-Encoding: chunked`, yielding the data each read completed, in one piece."""
        state, left = "size", 0  # states: size line, chunk data, its CRLF, trailers
        buf = self.buffer
        while True:
            out = bytearray()
            pos = 0
            while True:
                if state == "data":
                    take = min(left, len(buf) - pos)
                    out += buf[pos : pos + take]
                    pos += take
                    left -= take
                    if left:
                        break
                    state = "crlf"
                if state == "crlf":
                    if len(buf) - pos < 2:
                        break
                    if buf[pos : pos + 2] != b"\r\n":
                        raise httpx2.RemoteProtocolError("malformed chunked body")
                    pos += 2
                    state = "size"
                if state == "trailers":  # header lines after the last chunk, up to a blank one
                    end = buf.find(b"\r\n", pos)
                    if end < 0:
                        break
                    blank, pos = end == pos, end + 2
                    if blank:
                        del buf[:pos]
                        if out:
                            yield bytes(out)
                        return
                    continue
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                try:
                    left = int(bytes(buf[pos:end]).split(b";", 1)[0], 16)
                except ValueError:
                    raise httpx2.RemoteProtocolError("malformed chunk size") from None
                if left < 0:
                    raise httpx2.RemoteProtocolError("malformed chunk size")
                pos = end + 2
                state = "data" if left else "trailers"
            del buf[:pos]
            if out:
                yield bytes(out)
            await self._more()

    async def read_until_close(self) -> AsyncIterator[bytes]:
        while True:
            if self.buffer:
                piece = bytes(self.buffer)
                self.buffer.clear()
                yield piece
            if self.closed:
                return
            await self._more()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Body(httpx2.AsyncByteStream):
    """The response body; closing it early closes the socket (the upstream stops generating),
    reading it to the end puts the connection back in the pool."""

    def __init__(self, pool: FastTransport, key: tuple[str, str, int], conn: _Connection,
                 chunks: AsyncIterator[bytes], reusable: bool):
        self._pool, self._key, self._conn = pool, key, conn
        self._chunks, self._reusable = chunks, reusable
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk
        self._complete = True

    async def aclose(self) -> None:
        if self._complete and self._reusable and not self._conn.closed and not self._conn.buffer:
            self._pool.release(self._key, self._conn)
        else:
            self._conn.close()


class FastTransport(httpx2.AsyncBaseTransport):
    def __init__(self, *, connect_timeout: float, ssl_context: ssl.SSLContext | None = None):
        self._connect_timeout = connect_timeout
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        body = await request.aread()
        head = self._head(request)
        while True:
            conn, reused = self._idle_connection(key), True
            if conn is None:
                conn, reused = await self._connect(key), False
            assert conn.transport is not None
            conn.transport.write(head + body)
            try:
                status, headers = await conn.read_head()
                break
            except httpx2.RemoteProtocolError:
                conn.close()
                if not reused:  # a kept-alive connection the server had closed: try a fresh one
                    raise
            except BaseException:
                conn.close()  # cancelled while waiting: the upstream must see the close at once
                raise
        chunks, reusable = self._framing(request, conn, status, headers)
        return httpx2.Response(status, headers=headers, stream=_Body(self, key, conn, chunks, reusable),
                               extensions={"http_version": b"HTTP/1.1"})

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

    @staticmethod
    def _framing(request: httpx2.Request, conn: _Connection, status: int,
                 headers: list[tuple[bytes, bytes]]) -> tuple[AsyncIterator[bytes], bool]:
        fields = {name.lower(): value.lower() for name, value in headers}
        keep_alive = fields.get(b"connection") != b"close" and not conn.http10
        if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return conn.read_exactly(0), keep_alive
        if b"chunked" in fields.get(b"transfer-encoding", b""):
            return conn.read_chunked(), keep_alive
        if b"content-length" in fields:
            return conn.read_exactly(int(fields[b"content-length"])), keep_alive
        return conn.read_until_close(), False

    def _idle_connection(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.buffer:
                return conn
            conn.close()
        return None

    def release(self, key: tuple[str, str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < MAX_IDLE_PER_HOST:
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
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
            raise httpx2.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        return conn

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
