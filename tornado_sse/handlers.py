"""The HTTP edge, except /ask (ask.py): the page and its sign-in, /stop, /healthz, /metrics, and
what every handler shares: security headers, JSON errors, a log line without the query string."""

from __future__ import annotations

import logging
import math
from types import TracebackType
from typing import Any, cast

import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST
from tornado.http1connection import HTTP1Connection

from .backend import Backend
from .guard import (OWNER_COOKIE, SESSION_COOKIE, Gate, bearer, cross_site, new_id, secret_equals,
                    valid_owner)
from .settings import Settings
from .metrics import Metrics
from .errors import Failure
from .store import StoreError
from .registry import StreamRegistry
from .server import is_loopback

log = logging.getLogger(__name__)

PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")


class ClientError(tornado.web.HTTPError):
    """A request we refuse, with a code for machines and a sentence for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.code = code
        self.message = message
        self.headers = headers or {}

    @classmethod
    def unavailable(cls, failure: Failure) -> ClientError:
        """503 for a failure of a dependency (the shared store): try again in a moment."""
        return cls(503, failure.code, failure.message, {"Retry-After": "5"})


_GENERIC = {
    400: ("bad_request", "The request could not be understood."),
    404: ("not_found", "There is nothing at this address."),
    405: ("method_not_allowed", "This address does not accept that HTTP method."),
    413: ("request_too_large", "The request is too large."),
}


class BaseHandler(tornado.web.RequestHandler):
    def initialize(self, settings: Settings, gate: Gate) -> None:
        self.config = settings
        self.gate = gate

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

    def session(self) -> str | None:
        """The session id of a valid sign-in cookie: signed by us, younger than --session-max-age,
        not signed out."""
        # min_version=2: Tornado's version-1 decoder logs a rejected cookie's value.
        value = self.get_signed_cookie(SESSION_COOKIE, max_age_days=self.config.session_max_age / 86400,
                                       min_version=2)
        session = value.decode("utf-8", "replace") if value else None
        return session if session and not self.gate.revoked(session) else None

    def signed_in(self) -> bool:
        return self.config.access_token is None or self.session() is not None

    def check_access(self) -> None:
        """The gate in front of anything that spends: same-site pages only, and the token.

        A client whose failures used up its bucket gets 429 before its token is even compared,
        a right one included: an answer that differed would let the guessing go on (nginx's
        limit_req and fail2ban lock the address the same way). A valid signed session still
        passes: checking a signature tells nothing about the token.
        """
        if cross_site(self.request, self.config.allowed_origins):
            raise ClientError(403, "cross_site", "This server only answers its own page: a "
                              "request from another site was refused.")
        token = self.config.access_token
        if token is None or self.session() is not None:
            return
        self.check_failures()
        given = bearer(self.request)
        if given is not None and secret_equals(given, token):
            return
        self.gate.failures.take(self.client)
        raise ClientError(401, "unauthorized", "This server needs an access token: sign in on "
                          "its page, or send 'Authorization: Bearer <token>'.",
                          {"WWW-Authenticate": 'Bearer realm="tornado-sse"'})

    def check_failures(self) -> None:
        """429 while this client's failed attempts are used up."""
        wait = math.ceil(self.gate.failures.wait(self.client))
        if wait:
            raise ClientError(429, "too_many_failures", "Too many wrong access tokens from your "
                              f"address. Please wait {wait} s.", {"Retry-After": str(wait)})

    def owner(self) -> str:
        """This browser's owner id, from its cookie; a new one (and the cookie) when it has none.
        API clients keep the cookie like a browser does (curl -c/-b, a requests Session)."""
        value = self.get_cookie(OWNER_COOKIE)
        if value is not None and valid_owner(value):
            return value
        value = new_id()
        self.set_cookie(OWNER_COOKIE, value, httponly=True, samesite="Strict",
                        secure=self.request.protocol == "https", path="/")
        return value


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


class PageHandler(BaseHandler):
    def initialize(self, settings: Settings, gate: Gate, backend: Backend) -> None:  # type: ignore[override]
        super().initialize(settings, gate)
        self.backend = backend

    def get(self) -> None:
        self.set_header("Content-Security-Policy", PAGE_CSP)
        self.set_header("Cache-Control", "no-store")
        self.render("index.html", demo=self.backend.name == "demo", model=self.backend.model,
                    max_question_chars=self.config.max_question_chars,
                    resume_grace=self.config.resume_grace, needs_sign_in=not self.signed_in(),
                    can_sign_out=self.config.access_token is not None,
                    sign_in_failed=self.query("sign_in") == "failed")


class SignInHandler(BaseHandler):
    """POST /login: the page's sign-in form sets an HttpOnly, SameSite=Strict session cookie
    holding a new random session id, signed and timestamped (it expires after --session-max-age)."""

    def post(self) -> None:
        token = self.config.access_token
        if cross_site(self.request, self.config.allowed_origins):
            raise ClientError(403, "cross_site", "Sign in on this server's own page.")
        self.check_failures()
        given = self.get_body_argument("token", "")
        if token is not None and secret_equals(given.strip(), token):
            days = self.config.session_max_age / 86400
            self.set_signed_cookie(SESSION_COOKIE, new_id(), expires_days=days, httponly=True,
                                   samesite="Strict", secure=self.request.protocol == "https", path="/")
            self.redirect("/", status=303)
        else:
            self.gate.failures.take(self.client)
            self.redirect("/?sign_in=failed", status=303)


class SignOutHandler(BaseHandler):
    """POST /logout: this session is over, on this server, even if its cookie was copied; and
    the browser gets a new owner id, so the next person does not continue these conversations."""

    def post(self) -> None:
        if cross_site(self.request, self.config.allowed_origins):
            raise ClientError(403, "cross_site", "Sign out on this server's own page.")
        session = self.session()
        if session is not None:
            self.gate.revoke(session)
        self.clear_cookie(SESSION_COOKIE, path="/")
        self.clear_cookie(OWNER_COOKIE, path="/")
        self.redirect("/", status=303)


class HealthHandler(BaseHandler):
    def initialize(self, settings: Settings, gate: Gate, registry: StreamRegistry) -> None:  # type: ignore[override]
        super().initialize(settings, gate)
        self.registry = registry

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        backend = self.registry.backend
        store = self.registry.store
        status = "draining" if self.registry.draining else "ok" if store.up else "degraded"
        if status != "ok":
            self.set_status(503)
        body = {"status": status, "backend": backend.name, "model": backend.model}
        if store.shared:  # a dependency: say how it is
            body["store"] = "up" if store.up else "down"
        self.finish(body)


class MetricsHandler(BaseHandler):
    """GET /metrics in Prometheus' text format; from loopback only unless --public-metrics."""

    def initialize(self, settings: Settings, gate: Gate, metrics: Metrics) -> None:  # type: ignore[override]
        super().initialize(settings, gate)
        self.metrics = metrics

    def get(self) -> None:
        # The socket's own peer, not a proxy header: X-Forwarded-For must not open this. And a
        # proxy on this machine is a loopback peer for everyone it forwards: a request that
        # names a proxy hop came from elsewhere.
        peer = cast(HTTP1Connection, self.request.connection).stream.socket.getpeername()
        local = is_loopback(peer[0] if isinstance(peer, tuple) else "")
        proxied = any(name in self.request.headers for name in PROXY_HEADERS)
        if not self.config.public_metrics and (not local or proxied):
            raise ClientError(403, "forbidden", "Metrics are served to this machine only "
                              "(start with --public-metrics to change that).")
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.metrics.exposition())


# Headers a proxy adds (RFC 7239 Forwarded, the de-facto X-Forwarded-For and nginx's X-Real-IP,
# RFC 9110 Via).
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP", "Via")


class StopHandler(BaseHandler):
    """POST /stop?stream=ID: the reader pressed Stop; abort now, whatever the resume grace. The
    reader gets `finish` "stopped" and the end frame. Another browser's stream is unknown here."""

    def initialize(self, settings: Settings, gate: Gate, registry: StreamRegistry) -> None:  # type: ignore[override]
        super().initialize(settings, gate)
        self.registry = registry

    async def post(self) -> None:
        self.check_access()
        id, owner = self.query("stream") or "", self.owner()
        stream = self.registry.get(id, owner)
        if stream is not None and not stream.done:
            stream.stop()
        elif stream is not None or not await self.shared_stop(id, owner):
            # a finished one is only kept for a returning reader; else another instance's, perhaps
            raise ClientError(404, "unknown_stream", "There is no such answer being written.")
        self.set_status(204)

    async def shared_stop(self, id: str, owner: str) -> bool:
        try:
            return await self.registry.store.stop(id, owner)
        except StoreError as exc:
            raise ClientError.unavailable(exc.failure) from None
