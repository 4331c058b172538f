"""The HTTP server facing the network: what a connection may cost before it sends a request.

Tornado's HTTPServer with, on top:
- a request-head limit sized to the longest question, answered with a JSON 431 (Tornado itself
  drops the connection without a word);
- a deadline for the first request head, and a separate, shorter idle time between requests on a
  kept-alive connection (Tornado has one `idle_connection_timeout` for both);
- a cap on the open connections of one client address (other than this machine's own);
- an accept loop that pauses when the process is out of file descriptors instead of spinning.
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import json
import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, cast

import tornado.httpserver
from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream, UnsatisfiableReadError
from tornado.web import RequestHandler

log = logging.getLogger(__name__)

# Room in a request head besides the question: the request line's other parts and arguments
# (conversation id), ordinary headers, cookies. nginx's default is 1 KiB, then 8 KiB buffers.
HEAD_ROOM = 16 * 1024
# After EMFILE, asyncio's own server stops reading the listening socket for 1 s
# (selector_events._accept_connection, constants.ACCEPT_RETRY_DELAY) and nginx disables accept
# events for accept_mutex_delay (500 ms, ngx_event_accept.c); the same errors as asyncio.
ACCEPT_PAUSE = 0.5
# Connections accepted per readiness event. Tornado's add_accept_handler takes 128
# (netutil._DEFAULT_BACKLOG) and then runs everything else that is ready: with thousands of
# connections arriving at once the kernel's queue overflows, dropped SYNs are retried after 1, 3,
# 7 s, and 9,900 streams opened at once took 22 s instead of 12 (issue 12). asyncio's own servers
# take up to the listen backlog (selector_events._accept_connection); so do we.
ACCEPT_BATCH = 4096
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def max_head_bytes(max_question_chars: int) -> int:
    """The largest request head the longest question needs: every character 4 UTF-8 bytes, each
    byte percent-encoded as 3 (encodeURIComponent), plus HEAD_ROOM."""
    return 12 * max_question_chars + HEAD_ROOM


def canned(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    """A whole JSON error response, for the moments before Tornado has a request to answer."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            f"X-Content-Type-Options: nosniff\r\n{extra}Connection: close\r\n\r\n").encode() + body


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class _Connection:
    __slots__ = ("address", "requests", "context")

    def __init__(self, address: str):
        self.address = address
        self.requests = 0
        self.context: Any = None  # while an event stream holds the connection: its address etc.


class EdgeServer(tornado.httpserver.HTTPServer):
    """HTTPServer(app, header_timeout=, idle_connection_timeout=, max_connections_per_address=,
    max_header_size=, ...): Tornado's own arguments pass through."""

    def initialize(self, request_callback: Any, *, header_timeout: float,  # type: ignore[override]
                   keep_alive_timeout: float, max_connections_per_address: int,
                   **kwargs: Any) -> None:
        # Tornado's idle_connection_timeout is the deadline for a whole request head, counted
        # from when the server starts waiting for it (http1connection: header_timeout).
        super().initialize(request_callback, idle_connection_timeout=header_timeout,
                           body_timeout=header_timeout, **kwargs)
        self.keep_alive_params = copy.copy(self.conn_params)
        self.keep_alive_params.header_timeout = keep_alive_timeout
        self.max_connections_per_address = max_connections_per_address
        self.open_per_address: Counter[str] = Counter()
        self.connections: dict[IOStream, _Connection] = {}
        self.too_large = canned(
            431, "Request Header Fields Too Large", "request_too_large",
            f"The request is too large: its address and headers may hold at most "
            f"{(self.conn_params.max_header_size or 0) // 1024} KiB. Ask a shorter question.")

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        # TCPServer.add_sockets, with our accept loop (ACCEPT_BATCH) on a PausingListener.
        for sock in sockets:
            listener = PausingListener(sock)
            self._sockets[sock.fileno()] = cast(socket.socket, listener)
            self._handlers[sock.fileno()] = listener.serve(self._handle_connection)

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        peer = str(address[0]) if isinstance(address, tuple) and address else ""
        # Loopback peers are this machine's own: a proxy in front (started without
        # --trust-proxy-headers, it would otherwise cap everyone it serves), a benchmark, a probe.
        cap = 0 if is_loopback(peer) else self.max_connections_per_address
        if cap and self.open_per_address[peer] >= cap:
            self._refuse(stream, canned(
                429, "Too Many Requests", "too_many_connections",
                f"Too many open connections from your address (at most {cap}). Close some tabs "
                "or wait for answers to finish, then try again.", "Retry-After: 5\r\n"))
            return
        self.open_per_address[peer] += 1
        self.connections[stream] = _Connection(peer)
        if not isinstance(stream, SSLIOStream):
            self._answer_oversized_heads(stream)
        super().handle_stream(stream, address)

    def start_request(self, server_conn: object, request_conn: Any) -> Any:
        connection = self.connections.get(cast(HTTP1ServerConnection, server_conn).stream)
        if connection is not None:
            if connection.requests:  # waiting for the next request on a kept-alive connection
                cast(HTTP1Connection, request_conn).params = self.keep_alive_params
            connection.requests += 1
        return super().start_request(server_conn, request_conn)

    def on_close(self, server_conn: object) -> None:
        stream = cast(HTTP1ServerConnection, server_conn).stream
        if stream.closed():  # else an event stream holds it (detached), or it serves again
            self.release(stream)
        super().on_close(server_conn)

    # -- event streams: /ask takes its connection from Tornado, and gives it back at the end ------

    def hand_over(self, handler: RequestHandler) -> IOStream:
        """The connection of `handler`, whose response head is out, away from Tornado's HTTP
        machinery (RequestHandler.detach, as websockets do). It still counts as open here until
        `serve_again` or `release`."""
        request_conn = cast(HTTP1Connection, handler.request.connection)
        connection = self.connections.get(request_conn.stream)
        if connection is not None:
            connection.context = request_conn.context
        return handler.detach()

    def serve_again(self, stream: IOStream) -> None:
        """A handed-over connection's response is complete: read its next request, as Tornado's
        own HTTP1ServerConnection loop would have (HTTPServer.handle_stream)."""
        connection = self.connections.get(stream)
        if connection is None or connection.context is None or stream.closed():
            stream.close()
            self.release(stream)
            return
        context, connection.context = connection.context, None
        stream.set_nodelay(False)  # Tornado's default between responses (_finish_request)
        server_conn = HTTP1ServerConnection(stream, self.conn_params, context)
        self._connections.add(server_conn)
        server_conn.start_serving(self)

    async def close_all_connections(self) -> None:
        # Tornado's own closes the connections it serves; the handed-over ones are ours to close.
        for stream, connection in list(self.connections.items()):
            if connection.context is not None:
                stream.close()
        await super().close_all_connections()

    def release(self, stream: IOStream) -> None:
        """The connection is closed: it no longer counts against its address."""
        connection = self.connections.pop(stream, None)
        if connection is not None:
            self.open_per_address[connection.address] -= 1
            if not self.open_per_address[connection.address]:
                del self.open_per_address[connection.address]

    @staticmethod
    def _refuse(stream: IOStream, response: bytes) -> None:
        if not isinstance(stream, SSLIOStream):  # no TLS handshake yet: nothing to say it with
            try:
                stream.socket.send(response)
            except OSError:
                pass
        stream.close()

    def _answer_oversized_heads(self, stream: IOStream) -> None:
        # IOStream closes the socket itself when a head outgrows max_header_size ("Unsatisfiable
        # read, closing connection"), so a browser sees a reset. Say why first.
        close = stream.close
        too_large = self.too_large

        def close_with_answer(exc_info: Any = False) -> None:
            if isinstance(exc_info, UnsatisfiableReadError) and not stream.closed():
                try:
                    stream.socket.send(too_large)
                    stream.socket.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            close(exc_info)

        stream.close = close_with_answer  # type: ignore[method-assign]


class PausingListener:
    """A listening socket whose accept() pauses the IOLoop's reader when the process has no file
    descriptor left (EMFILE). Tornado's accept handler (netutil.add_accept_handler) does not catch
    it: the error escapes into asyncio, which logs it, and the still-readable socket brings it
    straight back, a busy loop that fills the log. Here it logs once, pauses, and tries again.

    Tornado uses only fileno(), accept() and close() of a listening socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.backing_off = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve(self, callback: Callable[[socket.socket, Any], None]) -> Callable[[], None]:
        """Tornado's netutil.add_accept_handler, ACCEPT_BATCH connections per event instead of 128;
        returns what stops it."""
        loop = IOLoop.current()
        removed = False

        def accept_ready(fd: Any, events: int) -> None:
            for _ in range(ACCEPT_BATCH):
                if removed:  # the socket was closed
                    return
                try:
                    connection, address = self.accept()
                except BlockingIOError:
                    return  # every waiting connection is accepted
                except ConnectionAbortedError:
                    continue  # closed while still in the queue
                callback(connection, address)

        def remove() -> None:
            nonlocal removed
            loop.remove_handler(self)
            removed = True

        loop.add_handler(self, accept_ready, IOLoop.READ)
        return remove

    def close(self) -> None:
        self.sock.close()

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            accepted = self.sock.accept()
        except OSError as exc:
            if exc.errno not in _OUT_OF_DESCRIPTORS:
                raise
            self._pause(exc)
            raise BlockingIOError(errno.EAGAIN, "paused") from None  # Tornado: "nothing to accept"
        if self.backing_off:
            self.backing_off = False
            log.info("accepting connections again")
        return accepted

    def _pause(self, exc: OSError) -> None:
        if not self.backing_off:
            self.backing_off = True
            log.warning("cannot accept connections: %s; trying again every %.1f s until "
                        "connections close", exc.strerror, ACCEPT_PAUSE)
        loop = IOLoop.current()
        loop.update_handler(self, 0)
        loop.call_later(ACCEPT_PAUSE, self._resume, loop)

    def _resume(self, loop: IOLoop) -> None:
        if self.sock.fileno() != -1:  # server.stop() closes the socket: then stay quiet
            loop.update_handler(self, IOLoop.READ)
