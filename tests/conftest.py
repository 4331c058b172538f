"""The real server on a real port, in front of the fake OpenAI-compatible upstream on its own."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
import tornado.httpserver
import tornado.ioloop
import tornado.web

from tornado_sse.app import make_app, make_server
from tornado_sse.backend import OpenAIBackend
from tornado_sse.demo import FakeUpstream
from tornado_sse.settings import Settings

API_KEY = "sk-test-SECRET-4f9c2a7e1b"
# One browser's owner cookie (guard.OWNER_COOKIE), for tests whose requests must be one client's.
OWNER = {"Cookie": "tornado_sse_owner=test-owner-0123456789abcdef"}


@pytest.fixture
def io_loop() -> Iterator[tornado.ioloop.IOLoop]:
    """pytest-tornado's own fixture relies on IOLoop.make_current(), which no longer sets the
    asyncio loop that `async def` tests are scheduled on; this one sets it for real."""
    asyncio.set_event_loop(asyncio.new_event_loop())
    loop = tornado.ioloop.IOLoop.current()
    yield loop
    loop.close(all_fds=True)
    asyncio.set_event_loop(None)


@pytest.fixture
def upstream(io_loop: tornado.ioloop.IOLoop) -> Iterator[tuple[FakeUpstream, int]]:
    fake = FakeUpstream()
    server, port = fake.listen()
    yield fake, port
    server.stop()


@pytest.fixture
def fake(upstream: tuple[FakeUpstream, int]) -> FakeUpstream:
    return upstream[0]


@pytest.fixture
def settings(request: pytest.FixtureRequest, upstream: tuple[FakeUpstream, int]) -> Settings:
    """The server's settings in front of the fake upstream; a test changes some with `tuned`."""
    settings = Settings(
        backend="openai",
        api_key=API_KEY,
        base_url=f"http://127.0.0.1:{upstream[1]}/v1",
        model="test-model",
        max_retries=0,
        first_token_timeout=2.0,
        idle_timeout=2.0,
        rate_limit=0,
        pad_frames=False,  # byte-exact expectations; test_padding.py turns it on
    )
    return with_settings(settings, **getattr(request, "param", {}))


def tuned(**changes: object) -> pytest.MarkDecorator:
    """These settings for one test: `@tuned(resume_grace=3.0)` (indirect parametrization)."""
    return pytest.mark.parametrize("settings", [changes], indirect=True)


@pytest.fixture
def app(settings: Settings, io_loop: tornado.ioloop.IOLoop) -> Iterator[tornado.web.Application]:
    backend = OpenAIBackend(settings)
    app = make_app(settings, backend)
    yield app
    registry = app.settings["registry"]
    tasks = [stream.task for stream in registry.streams.values() if stream.task is not None]
    for stream in list(registry.streams.values()):
        stream.abort()

    async def settle() -> None:
        # The aborted relays close their upstream connections before the pool closes the rest:
        # a socket left to the garbage collector is a ResourceWarning in whichever test runs next.
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await backend.close()

    io_loop.run_sync(settle)


@pytest.fixture
def http_server(app: tornado.web.Application, settings: Settings, _unused_port) -> Iterator[tornado.httpserver.HTTPServer]:
    """The server as the CLI builds it (its header and body limits included)."""
    server = make_server(app, settings)
    server.add_socket(_unused_port[0])
    yield server
    server.stop()


@pytest.fixture
def port(http_server: tornado.httpserver.HTTPServer, http_port: int) -> int:
    """The real server's port, with the server started (pytest-tornado's http_port alone does not)."""
    return http_port


@pytest.fixture
def base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def with_settings(settings: Settings, **changes: object) -> Settings:
    return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]

