"""/ask hands its connection over once the response head is out (eventsocket.py): a held stream
keeps none of Tornado's per-request objects, and at the end its connection serves the next
request, or closes when the request said so. (The per-address cap across a hand-over: test_edge.)"""

from __future__ import annotations

import asyncio
import gc
import socket

import pytest
from tornado.httputil import HTTPServerRequest

from tornado_sse.ask import AskHandler
from tornado_sse.demo import FakeUpstream, Script
from tornado_sse.eventsocket import EventSocket

from .conftest import tuned
from .sseclient import open_raw, read_until
from .test_edge import closed_after

pytestmark = pytest.mark.gen_test

LAST_CHUNK = b"\r\n0\r\n\r\n"  # the end frame's chunk ends, then the chunked body's last chunk


async def test_a_held_stream_keeps_no_handler_or_request_and_sends_without_delay(port, fake: FakeUpstream):
    fake.script = Script(deltas=["first", "second"], token_delay=10)
    reader, writer = await open_raw(port, "/ask?question=q")
    await read_until(reader, b"data: first")
    gc.collect()
    objects = gc.get_objects()
    assert not [o for o in objects if isinstance(o, AskHandler)]
    # (the fake upstream is a Tornado server in this process too: its own request is alive)
    assert not [o for o in objects if isinstance(o, HTTPServerRequest) and o.path == "/ask"]
    [held] = [o for o in objects if isinstance(o, EventSocket)]
    # Each frame goes out at once (asyncio and nginx's tcp_nodelay): Nagle would hold a token
    # back until the previous one was acknowledged.
    assert held.io.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    writer.close()


async def test_after_the_end_the_connection_serves_the_next_request(port, fake: FakeUpstream):
    fake.script = Script(deltas=["one", "two"])
    reader, writer = await open_raw(port, "/ask?question=q")
    body = await read_until(reader, LAST_CHUNK)
    assert body.endswith(b"data: <END_STREAMING_SSE>\n\n" + LAST_CHUNK)
    assert b"Connection: close" not in body
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = await asyncio.wait_for(read_until(reader, b'"status": "ok"'), 5)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    writer.write(b"GET /ask?question=again HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    again = await asyncio.wait_for(read_until(reader, LAST_CHUNK), 5)
    assert b"HTTP/1.1 200 OK\r\n" in again and b"data: two" in again
    assert len(fake.requests) == 2
    writer.close()


@tuned(keep_alive_timeout=1.5)
async def test_after_the_end_the_connection_waits_for_its_next_request_under_the_keep_alive_timeout(
        port, fake: FakeUpstream):
    fake.script = Script(deltas=["one"])
    reader, writer = await open_raw(port, "/ask?question=q")
    await read_until(reader, LAST_CHUNK)
    took = await closed_after(reader, writer, 10)
    assert 1.0 < took < 3.0  # the keep-alive timeout, not the first request's header timeout (20 s)
    writer.close()


async def test_a_request_that_says_connection_close_is_closed_after_its_end(port, fake: FakeUpstream):
    fake.script = Script(deltas=["one", "two"])
    reader, writer = await open_raw(port, "/ask?question=q", {"Connection": "close"})
    body = await asyncio.wait_for(reader.read(), 5)  # only the server's close ends this read
    head = body.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nConnection: close" in head and body.endswith(LAST_CHUNK)
    writer.close()
