"""make_app(settings, backend): the routes, where the page's files are, and the access log."""

from __future__ import annotations

import logging
import site
import sys
from pathlib import Path

import tornado.httpserver
import tornado.web

from .backend import Backend
from .handlers import AskHandler, HealthHandler, NotFoundHandler, PageHandler
from .settings import Settings

access_log = logging.getLogger("tornado_sse.access")

MAX_HEADER_BYTES = 1024 * 1024  # a 100 KB URL still gets a clean 413 instead of a dropped socket
MAX_BODY_BYTES = 64 * 1024  # nothing here takes a body


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


def log_request(handler: tornado.web.RequestHandler) -> None:
    """The access log line: the path without its query string, which holds the question."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    request = handler.request
    access_log.log(level, "%d %s %s %s %.1fms", status, request.method, request.path,
                   request.remote_ip, 1000.0 * request.request_time())


def make_app(settings: Settings, backend: Backend) -> tornado.web.Application:
    """The Application owns the set of open streams (`app.settings["streams"]`), for shutdown."""
    streams: set[AskHandler] = set()
    return tornado.web.Application(
        [
            (r"/", PageHandler, {"backend": backend, "settings": settings}),
            (r"/ask", AskHandler, {"backend": backend, "settings": settings, "streams": streams}),
            (r"/healthz", HealthHandler, {"backend": backend}),
        ],
        template_path=str(asset_dir("templates")),
        static_path=str(asset_dir("static")),
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        streams=streams,
        xsrf_cookies=False,  # no form posts: /ask is a GET the page opens with EventSource
    )


def make_server(app: tornado.web.Application) -> tornado.httpserver.HTTPServer:
    return tornado.httpserver.HTTPServer(app, max_header_size=MAX_HEADER_BYTES,
                                         max_body_size=MAX_BODY_BYTES)
