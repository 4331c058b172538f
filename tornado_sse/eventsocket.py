"""An event stream's connection once its response head is out: frames, pings, the end.

/ask checks a request, writes the response head and takes the connection from Tornado's HTTP
machinery (EdgeServer.hand_over). From then on a held stream costs this small object and its
IOStream, instead of Tornado's request, handler, connection objects and the coroutines waiting on
them (~8 kB a held stream, issue 12). At the end the body's last chunk goes out and the connection
goes back to the server for its next request (keep-alive), or closes: on HTTP/1.0, whose body only
the close can end, or when the request said `Connection: close`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from tornado.iostream import IOStream, SSLIOStream

from . import sse

if TYPE_CHECKING:
    from .server import EdgeServer
    from .streams import Stream
    from .store import RemoteStream


class EventSocket:
    """The Listener a Stream writes to (streams.Listener), on a connection whose head is out."""

    __slots__ = ("io", "edge", "chunked", "keep_alive", "direct", "send_timeout", "pinger",
                 "log_access", "stream", "remote", "relay", "active", "over", "queued")

    def __init__(self, io: IOStream, edge: EdgeServer | None, *, chunked: bool, keep_alive: bool,
                 send_timeout: float, pinger: Pinger, log_access: Callable[[], None]):
        self.io = io
        self.edge = edge  # the server counting the connection; None: one that cannot take it back
        self.chunked = chunked  # HTTP/1.1: chunks; HTTP/1.0: bare frames, the close ends the body
        self.keep_alive = keep_alive  # at the end the connection goes back to `edge`
        self.direct = not isinstance(io, SSLIOStream)  # plain TCP: frames go straight to send()
        self.send_timeout = send_timeout
        self.pinger = pinger
        self.log_access = log_access  # the access log line, written when the response is complete
        self.stream: Stream | None = None
        self.remote: RemoteStream | None = None  # a stream another instance produces (Redis)
        self.relay: asyncio.Task[None] | None = None  # the task following `remote`
        self.active = True  # a frame went out since the Pinger last looked (the head, at least)
        self.over = False  # ended or lost: nothing more is written
        # The IOStream's future for the last bytes queued on it: until it is done, more bytes go
        # behind them. (io.writing() says the same, for two Python calls a token.)
        self.queued: asyncio.Future[None] | None = io.write(b"") if io.writing() else None
        # Each frame is a whole message: send it now. Tornado leaves Nagle's algorithm on until a
        # response is finished; asyncio's transports and nginx (tcp_nodelay on) turn it off.
        io.set_nodelay(True)
        io.set_close_callback(self._closed)  # the browser went away
        pinger.add(self)

    def push(self, frame: bytes) -> asyncio.Future[None] | None:
        """Write a frame now. A future only when the socket is congested (a slow reader): done
        once the frame is out, or after --send-timeout, when the reader is given up."""
        self.active = True
        written = self.write(frame)
        if written is None or written.done():
            return None
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        timer = loop.call_later(self.send_timeout, self.lost)  # the close fails `written`

        def out(_: asyncio.Future[None]) -> None:
            timer.cancel()
            if not ready.done():
                ready.set_result(None)

        written.add_done_callback(out)
        return ready

    async def send(self, frame: bytes) -> None:
        """push(), waiting while the socket is congested."""
        ready = self.push(frame)
        if ready is not None:
            await ready

    def write(self, frame: bytes) -> asyncio.Future[None] | None:
        """One frame as a chunk of the chunked response (bare on HTTP/1.0)."""
        if self.over:
            return None
        if self.io.closed():
            self.lost()
            return None
        return self._write(b"%x\r\n%b\r\n" % (len(frame), frame) if self.chunked else frame)

    def _write(self, data: bytes) -> asyncio.Future[None] | None:
        """Straight to the socket when nothing is queued: one send() call, no futures or
        callbacks. Whatever the kernel does not take, and anything on TLS, goes through the
        IOStream, which keeps the order; its future says when that is out."""
        io = self.io
        if self.direct and (self.queued is None or self.queued.done()):
            try:
                sent = io.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.lost()
                return None
            if sent == len(data):
                return None
            data = data[sent:]
        self.queued = io.write(data)
        return self.queued

    def keepalive(self) -> None:
        """The Pinger's look, every --keepalive seconds: a ping if nothing went out since the last."""
        if self.active:
            self.active = False
        elif not self.over:
            self.write(sse.PING)

    def end(self, last: bytes) -> None:
        """The stream is over: its last frames and the body's end in one write, then the
        connection's next request, or its close."""
        if self.over:
            return
        self._finish()
        io = self.io
        if io.closed():
            return
        self.log_access()
        if self.chunked:
            tail = b"%x\r\n%b\r\n0\r\n\r\n" % (len(last), last) if last else b"0\r\n\r\n"
        else:
            tail = last  # HTTP/1.0: the close ends the body
        if self.keep_alive:
            io.set_close_callback(None)  # from here on the server watches the connection
        written = self._write(tail)
        if written is None:
            self._sent_last()
            return
        # A slow reader: the rest gets --send-timeout, as every frame did.
        timer = asyncio.get_running_loop().call_later(self.send_timeout, io.close)
        written.add_done_callback(lambda _: timer.cancel())
        written.add_done_callback(self._sent_last)

    def _sent_last(self, written: asyncio.Future[None] | None = None) -> None:
        """The last byte is out (or the connection failed on the way)."""
        io, edge = self.io, self.edge
        if not self.keep_alive or edge is None:
            io.close()  # the close callback gives the connection's place back
        elif (written is not None and written.exception() is not None) or io.closed():
            edge.release(io)  # the close callback is off
        else:
            edge.serve_again(io)

    def drop(self) -> None:
        """Another connection took the stream over."""
        self.lost()

    def lost(self) -> None:
        """Gone or too slow: let the stream go on without us (or abort), close the socket. Once:
        the close comes back as _closed, and a write may fail after the end."""
        if self.over:
            return
        if self.stream is not None:
            self.stream.detach(self)
        if self.remote is not None:
            self.remote.detach()
            if self.relay is not None:  # from inside it too: it stops at its next read
                self.relay.cancel()
        if not self.io.closed():
            self.io.close()  # runs _closed, which gives the connection's place back
        self._finish()

    def _closed(self) -> None:
        if self.edge is not None:
            self.edge.release(self.io)
        self.lost()

    def _finish(self) -> None:
        self.over = True
        self.pinger.discard(self)


class Pinger:
    """One timer for every open stream instead of a keep-alive task each (a task and its
    coroutine are ~1.5 kB a stream, and thousands of timers to re-arm): every `interval` seconds
    it asks each stream being followed to ping if it has been silent since the last look. A
    silent stream still gets its first ping between one and two intervals after its last frame."""

    def __init__(self, interval: float):
        self.interval = interval
        self.sockets: dict[EventSocket, None] = {}  # ordered: pings go out in arrival order
        self._timer: asyncio.TimerHandle | None = None

    def add(self, socket: EventSocket) -> None:
        self.sockets[socket] = None
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def discard(self, socket: EventSocket) -> None:
        self.sockets.pop(socket, None)

    def _tick(self) -> None:
        self._timer = None
        for socket in list(self.sockets):
            socket.keepalive()
        if self.sockets:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)
