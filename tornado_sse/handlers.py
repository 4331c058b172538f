"""The HTTP edge: the page and its sign-in, /ask (the SSE endpoint), /stop and /healthz.

    browser -> AskHandler -> StreamRegistry.start -> Stream.run: backend.stream(messages)
            <- AskHandler.send(frame) <- Stream.emit: sse.encode_event(...)
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
from types import TracebackType
from typing import Any, cast

import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError

from . import sse
from .backend import Backend
from .guard import COOKIE, RateLimiter, cross_site, secret_equals, session_value, token_matches
from .settings import Settings
from .metrics import Metrics
from .streams import Stream, StreamRegistry

log = logging.getLogger(__name__)

# C0 controls other than tab, LF and CR: nothing a person types, and NUL breaks some upstreams.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")
STREAM_GONE = ("stream_gone", "The answer was cut off: the connection was lost and the rest of it "
               "is no longer available. Ask again to get a new answer.")


class ClientError(tornado.web.HTTPError):
    """A request we refuse, with a code for machines and a sentence for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.code = code
        self.message = message
        self.headers = headers or {}


_GENERIC = {
    400: ("bad_request", "The request could not be understood."),
    404: ("not_found", "There is nothing at this address."),
    405: ("method_not_allowed", "This address does not accept that HTTP method."),
    413: ("request_too_large", "The request is too large."),
}


class BaseHandler(tornado.web.RequestHandler):
    def initialize(self, settings: Settings) -> None:
        self.config = settings

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "same-origin")
        self.set_header("X-Frame-Options", "DENY")
        if self.request.protocol == "https":
            self.set_header("Strict-Transport-Security", "max-age=31536000")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ClientError):
            code, message = exc.code, exc.message
            for name, value in exc.headers.items():
                self.set_header(name, value)
        else:
            code, message = _GENERIC.get(status_code, ("internal_error", "Something went wrong on this server."))
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish({"error": {"code": code, "message": message}})

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        # Tornado's own version prints the whole URI, and the question is in the query string.
        if not isinstance(value, tornado.web.HTTPError):
            log.error("uncaught exception in %s %s", self.request.method, self.request.path,
                      exc_info=(typ, value, tb))  # type: ignore[arg-type]

    def query(self, name: str) -> str | None:
        """A query argument, or None; bytes that are not UTF-8 are a clear 400 (Tornado's own
        message would quote them into the log)."""
        values = self.request.query_arguments.get(name)
        if not values:
            return None
        try:
            return values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ClientError(400, "invalid_encoding", f"The {name} is not valid UTF-8 text.") from None

    @property
    def client(self) -> str:
        """The client's address: the socket's, or the proxy's word for it with --trust-proxy-headers."""
        return self.request.remote_ip or "unknown"

    def signed_in(self) -> bool:
        token = self.config.access_token
        return token is None or token_matches(self.request, token)

    def check_access(self) -> None:
        """The gate in front of anything that spends: same-site pages only, and the token."""
        if cross_site(self.request, self.config.allowed_origins):
            raise ClientError(403, "cross_site", "This server only answers its own page: a "
                              "request from another site was refused.")
        if not self.signed_in():
            raise ClientError(401, "unauthorized", "This server needs an access token: sign in on "
                              "its page, or send 'Authorization: Bearer <token>'.",
                              {"WWW-Authenticate": 'Bearer realm="tornado-sse"'})


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


class PageHandler(BaseHandler):
    def initialize(self, settings: Settings, backend: Backend) -> None:  # type: ignore[override]
        super().initialize(settings)
        self.backend = backend

    def get(self) -> None:
        self.set_header("Content-Security-Policy", PAGE_CSP)
        self.set_header("Cache-Control", "no-store")
        self.render("index.html", demo=self.backend.name == "demo", model=self.backend.model,
                    max_question_chars=self.config.max_question_chars,
                    resume_grace=self.config.resume_grace, needs_sign_in=not self.signed_in(),
                    sign_in_failed=self.query("sign_in") == "failed")


class SignInHandler(BaseHandler):
    """POST /login: the page's sign-in form sets an HttpOnly, SameSite=Strict session cookie."""

    def initialize(self, settings: Settings, limiter: RateLimiter) -> None:  # type: ignore[override]
        super().initialize(settings)
        self.limiter = limiter

    def post(self) -> None:
        token = self.config.access_token
        if cross_site(self.request, self.config.allowed_origins):
            raise ClientError(403, "cross_site", "Sign in on this server's own page.")
        if self.limiter.take("sign-in " + self.client):
            raise ClientError(429, "rate_limited", "Too many sign-in attempts. Wait a minute.")
        given = self.get_body_argument("token", "")
        if token is not None and secret_equals(given.strip(), token):
            self.set_cookie(COOKIE, session_value(token), httponly=True, samesite="Strict",
                            secure=self.request.protocol == "https", path="/")
            self.redirect("/", status=303)
        else:
            self.redirect("/?sign_in=failed", status=303)


class HealthHandler(BaseHandler):
    def initialize(self, settings: Settings, registry: StreamRegistry) -> None:  # type: ignore[override]
        super().initialize(settings)
        self.registry = registry

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        backend = self.registry.backend
        if self.registry.draining:
            self.set_status(503)
        self.finish({"status": "draining" if self.registry.draining else "ok",
                     "backend": backend.name, "model": backend.model})


class MetricsHandler(BaseHandler):
    """GET /metrics in Prometheus' text format; from loopback only unless --public-metrics."""

    def initialize(self, settings: Settings, metrics: Metrics) -> None:  # type: ignore[override]
        super().initialize(settings)
        self.metrics = metrics

    def get(self) -> None:
        # The socket's own peer, not a proxy header: X-Forwarded-For must not open this.
        peer = cast(HTTP1Connection, self.request.connection).stream.socket.getpeername()
        if not self.config.public_metrics and not _is_loopback(peer[0] if isinstance(peer, tuple) else ""):
            raise ClientError(403, "forbidden", "Metrics are served to this machine only "
                              "(start with --public-metrics to change that).")
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.metrics.exposition())


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class StopHandler(BaseHandler):
    """POST /stop?stream=ID: the reader pressed Stop; abort now, whatever the resume grace."""

    def initialize(self, settings: Settings, registry: StreamRegistry) -> None:  # type: ignore[override]
        super().initialize(settings)
        self.registry = registry

    def post(self) -> None:
        self.check_access()
        stream = self.registry.get(self.query("stream") or "")
        if stream is None:
            raise ClientError(404, "unknown_stream", "There is no such answer being written.")
        stream.abort()
        self.set_status(204)


class AskHandler(BaseHandler):
    """GET /ask: one answer as Server-Sent Events; it always ends with the end frame.

    The generation runs in its Stream's own task; this handler is only its current reader. When
    the browser leaves, `on_connection_close` detaches it, which aborts the generation (at once,
    or after `--resume-grace`), closing the upstream response.
    """

    def initialize(self, settings: Settings, registry: StreamRegistry,  # type: ignore[override]
                   limiter: RateLimiter, metrics: Metrics) -> None:
        super().initialize(settings)
        self.registry = registry
        self.limiter = limiter
        self.metrics = metrics
        self.stream: Stream | None = None
        self.socket: IOStream | None = None
        self.closed: asyncio.Future[None] | None = None
        self.active = False  # a frame went out since the keep-alive last looked
        self.streaming = False  # the response headers are out

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
        wait = self.limiter.take(self.client)
        if wait:
            raise ClientError(429, "rate_limited", "Too many questions from your address. Please "
                              f"wait {math.ceil(wait)} s.", {"Retry-After": str(math.ceil(wait))})
        conversation, restarted = self.registry.conversations.open(self.query("conversation"))
        self.start_event_stream()
        self.stream = self.registry.start(conversation, question, restarted, self.client)
        self.stream.attach(self)
        await self.follow()

    async def resume(self, last_event_id: str) -> None:
        parsed = sse.parse_event_id(last_event_id)
        stream = self.registry.get(parsed[0]) if parsed else None
        self.start_event_stream()
        backlog = stream.attach(self, after=parsed[1]) if stream and parsed else None
        if stream is None or backlog is None:
            self.write(sse.encode_error(*STREAM_GONE) + sse.encode_end())
            self.finish()
            return
        self.stream = stream
        self.write(b"".join(backlog))
        if stream.done:
            self.finish()
            return
        self.streaming = True
        self.flush()
        await self.follow()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.metrics.rejected.labels(exc.code if isinstance(exc, ClientError) else str(status_code)).inc()
        super().write_error(status_code, **kwargs)

    def start_event_stream(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self.socket = cast(HTTP1Connection, self.request.connection).stream
        self.closed = asyncio.get_running_loop().create_future()

    async def follow(self) -> None:
        """Wait while the stream writes to us; ping while it is silent."""
        assert self.closed is not None
        pinger = asyncio.ensure_future(self.keepalive())
        try:
            await self.closed
        finally:
            pinger.cancel()

    async def keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.config.keepalive)
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
        else:
            written = self.write_chunk(frame)
        if written is not None and socket.writing():  # the kernel buffer is full: a slow reader
            try:
                await asyncio.wait_for(written, self.config.send_timeout)
            except (StreamClosedError, TimeoutError):
                self.lost()

    def write_chunk(self, frame: bytes) -> asyncio.Future[None] | None:
        """One chunk of the chunked response, straight to the socket when nothing is queued.

        The per-token path: one send() call, no futures or callbacks, which is most of what
        RequestHandler.flush would cost. Whatever the kernel does not take, and anything on TLS,
        goes through the IOStream, which keeps the order.
        """
        socket = self.socket
        assert socket is not None
        if socket.closed():
            self.lost()
            return None
        data = b"%x\r\n%b\r\n" % (len(frame), frame)
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
        if not self._finished:
            self.finish()
        self._resolve()

    def drop(self) -> None:
        self.lost()

    def lost(self) -> None:
        """Gone or too slow: let the stream go on without us (or abort), close the socket."""
        if self.stream is not None:
            self.stream.detach(self)
        if self.socket is not None and not self.socket.closed():
            self.socket.close()
        self._resolve()

    def on_connection_close(self) -> None:
        self.lost()

    def _resolve(self) -> None:
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

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
