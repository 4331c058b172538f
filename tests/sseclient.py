"""Test-side helpers: read a stream over real HTTP, and parse it the way a browser does."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import re
import time
from dataclasses import dataclass

import tornado.netutil
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from tornado_sse.app import make_app, make_server
from tornado_sse.backend import OpenAIBackend
from tornado_sse.settings import Settings
from tornado_sse.sse import END_MARKER

_LINE = re.compile(r"\r\n|\r|\n")


def next_frame(response: http.client.HTTPResponse, deadline: float = math.inf) -> tuple[str, str, str]:
    """The next frame of an event stream read line by line (through nginx, say): (id, event,
    data), comments and pings skipped. A stream that ends or outlives `deadline` fails the test."""
    fields: dict[str, str] = {}
    while True:
        assert time.monotonic() < deadline, "the stream did not end"
        line = response.readline().decode()
        assert line, "the stream ended without its end frame"
        if line == "\n" and "data" in fields:
            return fields.get("id", ""), fields.get("event", "message"), fields["data"]
        name, _, value = line.rstrip("\n").partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data" and "data" in fields:
            value = fields["data"] + "\n" + value
        if name:  # not a ': ping' comment
            fields[name] = value


def parse_events(body: bytes) -> list[tuple[str, str]]:
    """(type, data) of each event an EventSource would dispatch (WHATWG HTML, 9.2.6)."""
    events: list[tuple[str, str]] = []
    event, data = "", list[str]()
    for line in _LINE.split(body.decode("utf-8")):
        if line == "":
            if data:
                events.append((event or "message", "\n".join(data)))
            event, data = "", list[str]()
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    return events


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def events(self) -> list[tuple[str, str]]:
        return parse_events(self.body)

    @property
    def meta(self) -> dict[str, object]:
        """The first frame's JSON: conversation and stream ids."""
        event, data = self.events[0]
        assert event == "meta", self.events[:1]
        meta: dict[str, object] = json.loads(data)
        return meta

    @property
    def after_meta(self) -> list[tuple[str, str]]:
        return self.events[1:]

    @property
    def text(self) -> str:
        """The answer as the reference page shows it: updates up to the end marker, joined."""
        out = []
        for event, data in self.events:
            if event == "update":
                if data == END_MARKER:
                    break
                out.append(data)
        return "".join(out)

    @property
    def finish(self) -> dict[str, object] | None:
        """The `finish` event's JSON (why the answer ended, its usage), None when there is none."""
        found = [json.loads(data) for event, data in self.events if event == "finish"]
        assert len(found) <= 1, found
        return found[0] if found else None

    @property
    def errors(self) -> list[str]:
        return [data for event, data in self.events if event == "error"]


async def ask(base_url: str, query: str, timeout: float = 10.0,
              headers: dict[str, str] | None = None) -> Answer:
    response: HTTPResponse = await AsyncHTTPClient().fetch(
        base_url + "/ask?" + query, raise_error=False, request_timeout=timeout, headers=headers
    )
    return Answer(response.code, dict(response.headers.get_all()), response.body or b"")


async def open_raw(port: int, target: str, headers: dict[str, str] | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare HTTP/1.1 request on its own socket, for tests that hang up mid-stream."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{lines}\r\n".encode())
    await writer.drain()
    return reader, writer


async def read_until(reader: asyncio.StreamReader, needle: bytes, count: int = 1) -> bytes:
    """Read until `needle` has been seen `count` times."""
    seen = b""
    while seen.count(needle) < count:
        chunk = await reader.read(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {seen!r}")
        seen += chunk
    return seen


class serving:
    """A second real server with other settings, for the tests that need one."""

    def __init__(self, settings: Settings, scheme: str = "http"):
        self.settings, self.scheme = settings, scheme

    async def __aenter__(self) -> str:
        self.backend = OpenAIBackend(self.settings)
        [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.server = make_server(make_app(self.settings, self.backend), self.settings)
        self.server.add_sockets([sock])
        return f"{self.scheme}://127.0.0.1:{sock.getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.stop()
        await self.backend.close()
