"""make_app(settings, backend): the routes, the state the Application owns, where the page's files
are, and the access log. make_server(app, settings): the HTTP server with its limits and TLS."""

from __future__ import annotations

import secrets
import site
import ssl
import sys
from pathlib import Path

import tornado.httpserver
import tornado.web

from .backend import Backend
from .guard import Gate
from .ask import AskHandler
from .eventsocket import Pinger
from .handlers import (HealthHandler, MetricsHandler, NotFoundHandler, PageHandler, SignInHandler,
                       SignOutHandler, StopHandler)
from .logs import StreamSummary, log_request
from .metrics import Metrics
from .server import EdgeServer, max_head_bytes
from .settings import Settings
from .store import make_store
from .registry import StreamRegistry

MAX_BODY_BYTES = 64 * 1024  # only the sign-in form has a body


def asset_dir(name: str) -> Path:
    """templates/ or static/: beside the package in a checkout, under share/ once installed."""
    candidates = [
        Path(__file__).resolve().parent.parent / name,
        Path(sys.prefix) / "share" / "tornado-sse" / name,
        Path(site.getuserbase()) / "share" / "tornado-sse" / name,
    ]
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"{name}/ not found in any of: {', '.join(map(str, candidates))}")


def make_app(settings: Settings, backend: Backend) -> tornado.web.Application:
    """The Application owns the stream registry (`app.settings["registry"]`): open streams and the
    count the limits and the shutdown use (conversations are the store's)."""
    store = make_store(settings)  # conversations, the rate limit, what other instances read
    registry = StreamRegistry(backend, store, max_streams=settings.max_streams,
                              resume_grace=settings.resume_grace, resume_buffer=settings.resume_buffer,
                              pad_frames=settings.pad_frames)
    metrics = Metrics(registry)
    registry.on_finish.append(StreamSummary(settings.log_content))
    gate = Gate(settings.session_max_age)
    store.watch_sessions(gate)
    common = {"settings": settings, "gate": gate}
    return tornado.web.Application(
        [
            (r"/", PageHandler, {**common, "backend": backend}),
            (r"/ask", AskHandler, {**common, "registry": registry, "metrics": metrics,
                                   "pinger": Pinger(settings.keepalive)}),
            (r"/metrics", MetricsHandler, {**common, "metrics": metrics}),
            (r"/stop", StopHandler, {**common, "registry": registry}),
            (r"/login", SignInHandler, common),
            (r"/logout", SignOutHandler, common),
            (r"/healthz", HealthHandler, {**common, "registry": registry}),
        ],
        template_path=str(asset_dir("templates")),
        static_path=str(asset_dir("static")),
        default_handler_class=NotFoundHandler,
        default_handler_args=common,
        log_function=log_request,
        registry=registry,
        # Signs the session cookies. Unset, a random one: a restart then signs everyone out (a
        # shared store refuses to start without one: every instance must verify every cookie).
        cookie_secret=settings.session_secret or secrets.token_urlsafe(32),
        xsrf_cookies=False,  # the state-changing requests check Origin/Sec-Fetch-Site instead
    )


def make_server(app: tornado.web.Application, settings: Settings) -> tornado.httpserver.HTTPServer:
    ssl_context = None
    if settings.certfile and settings.keyfile:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(settings.certfile, settings.keyfile)
    # Behind a proxy every connection comes from the proxy: the per-address cap would cap it.
    per_address = 0 if settings.trust_proxy_headers else settings.max_connections_per_address
    server = EdgeServer(
        app, max_header_size=max_head_bytes(settings.max_question_chars),
        max_body_size=MAX_BODY_BYTES, ssl_options=ssl_context, xheaders=settings.trust_proxy_headers,
        header_timeout=settings.header_timeout, keep_alive_timeout=settings.keep_alive_timeout,
        max_connections_per_address=per_address)
    app.settings["edge"] = server  # /ask hands its event streams' connections over to it
    return server
