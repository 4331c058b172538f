"""The HTTP edge: the page, /ask (the SSE endpoint) and /healthz.

    browser -> AskHandler -> backend.stream(messages) -> sse.encode_*(...) -> socket
"""

from __future__ import annotations

import asyncio
import logging
import re
from types import TracebackType
from typing import Any

import tornado.web
from tornado.iostream import StreamClosedError

from . import sse
from .backend import Backend
from .errors import Failure, describe
from .settings import Settings

log = logging.getLogger(__name__)

# C0 controls other than tab, LF and CR: nothing a person types, and NUL breaks some upstreams.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ClientError(tornado.web.HTTPError):
    """A request we refuse, with a code for machines and a sentence for people."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(status)
        self.code = code
        self.message = message


SHUTTING_DOWN = Failure("server_shutdown", "The server is restarting. Please ask again in a moment.")

_GENERIC = {
    404: ("not_found", "There is nothing at this address."),
    405: ("method_not_allowed", "This address does not accept that HTTP method."),
}


class BaseHandler(tornado.web.RequestHandler):
    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ClientError):
            code, message = exc.code, exc.message
        else:
            code, message = _GENERIC.get(status_code, ("internal_error", describe(Exception()).message))
        self.finish({"error": {"code": code, "message": message}})

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Tornado's own version prints the whole URI, and the question is in the query string.
        if not isinstance(value, tornado.web.HTTPError):
            log.error("uncaught exception in %s %s", self.request.method, self.request.path,
                      exc_info=(typ, value, tb))  # type: ignore[arg-type]


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


class PageHandler(BaseHandler):
    def initialize(self, backend: Backend, settings: Settings) -> None:
        self.backend = backend
        self.settings_ = settings

    def get(self) -> None:
        self.render("index.html", demo=self.backend.name == "demo", model=self.backend.model,
                    max_question_chars=self.settings_.max_question_chars)


class HealthHandler(BaseHandler):
    def initialize(self, backend: Backend) -> None:
        self.backend = backend

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.finish({"status": "ok", "backend": self.backend.name, "model": self.backend.model})


class AskHandler(BaseHandler):
    """Streams one answer as `update` frames and always ends with the end frame.

    The relay runs as its own task so that `on_connection_close` can cancel it: cancelling closes
    the upstream response at once, whatever the relay was waiting for.
    """

    def initialize(self, backend: Backend, settings: Settings, streams: set[AskHandler]) -> None:
        self.backend = backend
        self.settings_ = settings
        self.streams = streams  # the open streams, owned by the Application
        self.relay: asyncio.Task[None] | None = None
        self.shutting_down = False

    async def get(self) -> None:
        question = self.question()
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        try:
            await self.flush()  # the browser sees the stream open before the upstream answers
        except StreamClosedError:
            return
        self.relay = asyncio.ensure_future(self.relay_answer([{"role": "user", "content": question}]))
        self.streams.add(self)
        try:
            await self.relay
        except asyncio.CancelledError:
            pass  # the browser left; the relay closed the upstream on its way out
        finally:
            self.streams.discard(self)

    def on_connection_close(self) -> None:
        if self.relay is not None:
            self.relay.cancel()

    def shut_down(self) -> None:
        """End this stream now with an error frame and the end frame (the server is stopping)."""
        self.shutting_down = True
        if self.relay is not None:
            self.relay.cancel()

    async def relay_answer(self, messages: list[dict[str, str]]) -> None:
        stream = self.backend.stream(messages)
        try:
            try:
                async for event, text in stream:
                    self.write(sse.encode_update(text) if event == "update" else sse.encode_event(event, text))
                    await self.flush()
            except StreamClosedError:
                raise
            except asyncio.CancelledError:
                if not self.shutting_down:
                    raise
                await stream.aclose()  # close the upstream before the last frames go out
                self.write(sse.encode_error(*SHUTTING_DOWN))
            except Exception as exc:
                failure = describe(exc)
                log.warning("stream failed (%s): %s: %s", failure.code, type(exc).__name__, exc,
                            exc_info=failure.code == "internal_error")
                self.write(sse.encode_error(*failure))
            self.write(sse.END_FRAME)
            await self.finish()
        except StreamClosedError:
            pass  # the browser left while we wrote
        finally:
            await stream.aclose()

    def question(self) -> str:
        values = self.request.query_arguments.get("question")
        if not values:
            raise ClientError(400, "missing_question", "Ask a question: /ask?question=your+question")
        try:
            question = values[-1].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ClientError(400, "invalid_encoding", "The question is not valid UTF-8 text.") from None
        if not question:
            raise ClientError(400, "missing_question", "The question is empty. Type a question first.")
        limit = self.settings_.max_question_chars
        if len(question) > limit:
            raise ClientError(413, "question_too_long",
                              f"The question is {len(question):,} characters long; "
                              f"this server accepts at most {limit:,}.")
        if _CONTROL_CHARS.search(question):
            raise ClientError(400, "invalid_characters",
                              "The question contains control characters (such as NUL) "
                              "that cannot be sent to the model.")
        return question


async def end_all_streams(streams: set[AskHandler], timeout: float) -> None:
    """Shutdown: every open stream gets an error frame and the end frame, within `timeout`."""
    for handler in list(streams):
        handler.shut_down()
    deadline = asyncio.get_running_loop().time() + timeout
    while streams and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
