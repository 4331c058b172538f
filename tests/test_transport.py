"""The lean upstream transport: HTTP/1.1 framing, keep-alive, and the aiohttp alternative."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import httpx2
import pytest

from tornado_sse.demo import Script
from tornado_sse.connection import HIGH_WATER, _Connection
from tornado_sse.transport import FastTransport

from .conftest import with_settings
from .sseclient import ask, serving

pytestmark = pytest.mark.gen_test


class FakeTransport(asyncio.Transport):
    paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


async def decode_chunked(wire: bytes, cuts: list[int]) -> bytes:
    """The body of a chunked response whose body arrives in reads ending at `cuts`."""
    conn = _Connection()
    conn.connection_made(FakeTransport())
    conn.start()
    conn.data_received(HEAD)
    assert await conn.read_head() == (200, [(b"Transfer-Encoding", b"chunked")])
    out = bytearray()

    async def feed() -> None:
        start = 0
        for end in [*cuts, len(wire)]:
            conn.data_received(wire[start:end])
            start = end
            await asyncio.sleep(0)

    feeder = asyncio.ensure_future(feed())
    try:
        async for piece in conn.read_body():
            out += piece
    finally:
        await feeder
    assert conn.complete and conn.keep_alive
    return bytes(out)


WIRE = b"5\r\nhello\r\n1;ext=1\r\n \r\nB\r\nworld\r\n\r\n!!\r\n0\r\nTrailer: x\r\n\r\n"


async def test_chunked_bodies_decode_at_every_split():
    assert await decode_chunked(WIRE, []) == b"hello world\r\n\r\n!!"
    for i in range(1, len(WIRE)):
        for j in range(i, len(WIRE), 3):
            assert await decode_chunked(WIRE, [i, j]) == b"hello world\r\n\r\n!!", (i, j)


def answering() -> tuple[_Connection, FakeTransport]:
    """A connection whose chunked answer's head has arrived."""
    conn, transport = _Connection(), FakeTransport()
    conn.connection_made(transport)
    conn.start()
    conn.data_received(HEAD)
    return conn, transport


class Sink:
    def __init__(self, ready: list[asyncio.Future[None] | None] | None = None):
        self.got = bytearray()
        self.ready = ready or []  # what each feed() answers: a future holds the body back
        self.satisfied = False

    def feed(self, piece: bytes) -> asyncio.Future[None] | None:
        self.got += piece
        return self.ready.pop(0) if self.ready else None


async def test_a_pumped_body_reaches_its_sink_within_the_read_at_every_split():
    for i in range(1, len(WIRE)):
        for j in range(i, len(WIRE), 3):
            conn, _ = answering()
            sink = Sink()
            done = conn.pump(sink)
            start = 0
            for end in [i, j, len(WIRE)]:
                conn.data_received(WIRE[start:end])
                start = end
                # Pushed from data_received itself: nothing waits for a task or a loop turn.
                assert not conn.body, (i, j)
            assert done.done() and bytes(sink.got) == b"hello world\r\n\r\n!!", (i, j)
            assert conn.complete and conn.keep_alive and conn.sink is None


async def test_a_congested_sink_pauses_the_upstream_until_its_reader_catches_up():
    conn, transport = answering()
    caught_up = asyncio.get_running_loop().create_future()
    sink = Sink([caught_up])
    done = conn.pump(sink)
    conn.data_received(b"5\r\nhello\r\n")
    assert transport.paused and sink.got == b"hello"
    conn.data_received(b"5\r\nworld\r\n")  # already on its way when reading paused
    assert sink.got == b"hello"
    caught_up.set_result(None)
    await asyncio.sleep(0)
    assert not transport.paused and sink.got == b"helloworld"
    conn.data_received(b"0\r\n\r\n")
    await done


async def test_a_read_over_the_high_water_mark_pauses_a_pulled_body_but_never_a_pumped_one():
    # One read can be that large: asyncio's TLS layer hands over all it has decrypted at once.
    big = b"x" * (HIGH_WATER + 1)
    wire = b"%x\r\n%b\r\n" % (len(big), big)
    conn, transport = answering()
    sink = Sink()
    conn.pump(sink)
    conn.data_received(wire)
    assert sink.got == big and not transport.paused  # nothing else would resume it
    conn, transport = _Connection(), FakeTransport()
    conn.connection_made(transport)
    conn.start()
    conn.data_received(HEAD + wire)  # with the head: pulled so far, too much unread
    assert transport.paused
    await conn.read_head()
    sink = Sink()
    conn.pump(sink)
    assert sink.got == big and not transport.paused


async def test_a_pump_stops_once_its_sink_is_satisfied_and_the_rest_is_read_by_pulling():
    conn, _ = answering()
    sink = Sink()
    done = conn.pump(sink)
    sink.satisfied = True
    conn.data_received(b"4\r\nlast\r\n")
    assert done.done() and sink.got == b"last"
    conn.data_received(b"4\r\nmore\r\n0\r\n\r\n")
    assert sink.got == b"last"
    assert [piece async for piece in conn.read_body()] == [b"more"]


async def test_a_connection_lost_mid_body_fails_the_pump():
    conn, _ = answering()
    done = conn.pump(Sink())
    conn.data_received(b"5\r\nhello\r\n")
    conn.connection_lost(None)
    with pytest.raises(httpx2.RemoteProtocolError, match="mid-response"):
        await done


async def test_the_last_piece_arriving_while_the_reader_is_busy_is_still_read():
    conn, _ = answering()
    conn.data_received(b"5\r\nhello\r\n")
    out = []
    async for piece in conn.read_body():
        out.append(piece)
        if len(out) == 1:  # the rest and the body's end come while the reader handles `hello`
            conn.data_received(b"5\r\nworld\r\n0\r\n\r\n")
    assert out == [b"hello", b"world"]


async def test_the_end_alone_arriving_while_the_reader_is_busy_ends_the_body():
    conn, _ = answering()
    conn.data_received(b"5\r\nhello\r\n")
    async with asyncio.timeout(1):
        async for piece in conn.read_body():
            assert piece == b"hello"
            conn.data_received(b"0\r\n\r\n")  # only the chunked body's end, while busy
    assert conn.complete
    # A body without length or chunks ends at the close: one coming while busy ends it too.
    conn, transport = _Connection(), FakeTransport()
    conn.connection_made(transport)
    conn.start()
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\nhello")
    await conn.read_head()
    async with asyncio.timeout(1):
        async for piece in conn.read_body():
            assert piece == b"hello"
            conn.eof_received()
    assert conn.complete


@pytest.mark.parametrize("wire", [b"zz\r\nab\r\n0\r\n\r\n", b"-1\r\nab\r\n0\r\n\r\n", b"2\r\nabXX0\r\n\r\n"])
async def test_a_malformed_chunked_body_is_a_protocol_error(wire):
    with pytest.raises(httpx2.RemoteProtocolError):
        await decode_chunked(wire, [])


class BareServer:
    """A bare asyncio server on loopback: `async with` gives its base URL; `handle` serves one
    connection. Connections still open at the end are closed."""

    writers: list[asyncio.StreamWriter]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in getattr(self, "writers", []):
            writer.close()
            await writer.wait_closed()


class CountingServer(BareServer):
    """A bare HTTP/1.1 server that answers each request with `responses`, counting connections."""

    def __init__(self, responses: list[bytes], close_after_each: bool = False):
        self.responses, self.close_after_each = responses, close_after_each
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while self.responses:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            writer.write(self.responses.pop(0))
            await writer.drain()
            if self.close_after_each:
                break
        writer.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"


async def test_a_finished_response_leaves_its_connection_for_the_next_request():
    server = CountingServer([OK, CHUNKED, OK])
    async with server as url, httpx2.AsyncClient(transport=FastTransport(connect_timeout=2)) as client:
        bodies = [(await client.get(url + "/")).content for _ in range(3)]
    assert bodies == [b"ok", b"hi", b"ok"] and server.connections == 1


async def test_connection_close_and_http10_answers_are_not_reused():
    server = CountingServer([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                             b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
                             b"HTTP/1.0 200 OK\r\n\r\nuntil close"], close_after_each=True)
    async with server as url, httpx2.AsyncClient(transport=FastTransport(connect_timeout=2)) as client:
        bodies = [(await client.get(url + "/")).content for _ in range(3)]
    assert bodies == [b"ok", b"ok", b"until close"] and server.connections == 3


async def test_a_kept_alive_connection_the_server_closed_is_retried_on_a_fresh_one():
    server = CountingServer([OK, OK], close_after_each=True)  # closes although it said keep-alive
    async with server as url, httpx2.AsyncClient(transport=FastTransport(connect_timeout=2)) as client:
        first = await client.get(url + "/")
        await asyncio.sleep(0.05)
        second = await client.get(url + "/")
    assert (first.content, second.content) == (b"ok", b"ok") and server.connections == 2


async def test_connection_refused_is_httpxs_connect_error():
    async with httpx2.AsyncClient(transport=FastTransport(connect_timeout=2)) as client:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(httpx2.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")



@pytest.mark.parametrize("settings", [{"upstream_transport": "aiohttp"}], indirect=True)
async def test_the_sdks_aiohttp_client_streams_the_same(base_url, fake):
    fake.script = Script(deltas=["a\nb", " \u00e9"], fail=None)
    answer = await ask(base_url, "question=q")
    assert answer.text == "a\nb \u00e9" and not answer.errors
    fake.script = Script(deltas=["x", "y"], fail="truncate", fail_after=1)
    cut = await ask(base_url, "question=q")
    assert cut.text == "x" and '"upstream_incomplete"' in cut.errors[0]


class StaleAfterWarmUp(BareServer):
    """An upstream whose kept-alive connections, once `stale` is set, read the next request and
    close without answering (as a server that timed them out does); new connections answer."""

    def __init__(self) -> None:
        self.posts, self.connections, self.stale = 0, 0, False
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        opened_stale = self.stale
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                self.posts += 1
                if self.stale and not opened_stale:
                    break
                await asyncio.sleep(0.05)  # so warm-up requests each need a connection of their own
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def test_a_request_on_stale_kept_alive_connections_is_resent_once_and_logged(caplog):
    upstream = StaleAfterWarmUp()
    async with upstream as url, httpx2.AsyncClient(transport=FastTransport(connect_timeout=2)) as client:
        warm = await asyncio.gather(*[client.post(url + "/", content=b"{}") for _ in range(8)])
        assert [r.content for r in warm] == [b"ok"] * 8 and upstream.connections == 8
        upstream.stale, upstream.posts = True, 0
        with caplog.at_level(logging.INFO, logger="tornado_sse.transport"):
            answer = await client.post(url + "/", content=b"{}")
    # One POST on an idle connection, seen closed; one on a new connection. Not one per idle one.
    assert answer.content == b"ok" and upstream.posts == 2 and upstream.connections == 9
    [line] = [r.getMessage() for r in caplog.records if r.name == "tornado_sse.transport"]
    assert "closed an idle keep-alive connection" in line and "sending the request again" in line


async def test_a_new_connection_closed_before_answering_is_not_resent():
    posts = 0

    async def close_after_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal posts
        await reader.readuntil(b"\r\n\r\n")
        posts += 1
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(close_after_reading, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        async with httpx2.AsyncClient(transport=FastTransport(connect_timeout=2)) as client:
            with pytest.raises(httpx2.RemoteProtocolError):
                await client.post(url, content=b"")
    finally:
        server.close()
    assert posts == 1


def chat_answer(*texts: str, interim: bytes = b"") -> bytes:
    """A whole Chat Completions stream as an upstream writes it, after `interim` 1xx answers."""
    body = b"".join(b"data: " + json.dumps({"choices": [{"delta": {"content": t}}]}).encode() + b"\n\n"
                    for t in texts) + b"data: [DONE]\n\n"
    return interim + (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked"
                      b"\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
])
async def test_interim_1xx_answers_are_skipped_for_the_real_one(settings, interim):
    server = CountingServer([chat_answer("hello", " there", interim=interim)])
    async with server as url, serving(with_settings(settings, base_url=url + "/v1")) as ours:
        answer = await ask(ours, "question=q")
    assert answer.text == "hello there" and not answer.errors
    assert answer.events[-1] == ("update", "<END_STREAMING_SSE>")
