"""The HTTP edge: HTTP/1.0 framing and close, 204 for a reconnect with nothing left to send, the
request-head limit and deadline, the keep-alive timeout and the per-address connection cap."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import tornado.netutil
from tornado.httpclient import AsyncHTTPClient

from tornado_sse import sse
from tornado_sse.app import make_app, make_server
from tornado_sse.backend import OpenAIBackend
from tornado_sse.demo import FakeUpstream, Script
from tornado_sse.settings import Settings

from .conftest import OWNER, tuned, with_settings
from .sseclient import ask, read_until
from .test_cli import CLEAN_ENV

pytestmark = pytest.mark.gen_test(timeout=30)




async def exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send `request` as is; everything the server sends until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def expected_frames(stream: str, meta: str, deltas: list[str], finish: str) -> bytes:
    frames = [sse.encode_event("meta", meta, f"{stream}.1")]
    frames += [sse.encode_event("update", d, f"{stream}.{i}") for i, d in enumerate(deltas, 2)]
    frames.append(sse.encode_event("finish", finish, f"{stream}.{len(deltas) + 2}"))
    return b"".join(frames) + sse.encode_end(f"{stream}.{len(deltas) + 3}")


# -- HTTP/1.0 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("connection", ["", "Connection: keep-alive\r\n"])
async def test_http_1_0_gets_bare_frames_and_the_close_ends_the_body(port, fake: FakeUpstream, connection):
    # curl --http1.0, and nginx's proxy_pass without proxy_http_version 1.1: no chunk-size lines
    # in the body, which ends when the server closes the connection, keep-alive asked or not.
    fake.script = Script(deltas=["Hello", ", ", "world\nagain"], token_delay=0.05)
    raw = await exchange(port, f"GET /ask?question=hi HTTP/1.0\r\n{connection}\r\n".encode())
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Transfer-Encoding" not in head and b"Content-Length" not in head
    assert b"\r\nConnection: close" in head and b"Keep-Alive" not in head
    meta_line = body.split(b"\n")[2].decode()
    stream = json.loads(meta_line[len("data: "):])["stream"]
    finish = body.split(b"event: finish\ndata: ", 1)[1].split(b"\n", 1)[0].decode()
    assert json.loads(finish)["reason"] == "stop"  # its usage counts are the fake's
    assert body == expected_frames(stream, meta_line[len("data: "):], ["Hello", ", ", "world\nagain"], finish)


@tuned(keepalive=0.2)
async def test_http_1_0_pings_are_bare_too(port, fake: FakeUpstream):
    fake.script = Script(deltas=["late"], first_token_delay=0.5)
    raw = await exchange(port, b"GET /ask?question=hi HTTP/1.0\r\n\r\n")
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert b": ping\n\nid: " in body and b"\r\n" not in body
    assert body.endswith(b"data: <END_STREAMING_SSE>\n\n")


async def test_http_1_1_is_still_chunked(port, fake: FakeUpstream):
    fake.script = Script(deltas=["Hello"])
    raw = await exchange(port, b"GET /ask?question=hi HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head and body.endswith(b"\r\n0\r\n\r\n")


# -- a reconnect with nothing left to send: 204, the SSE spec's "stop reconnecting" --------------

@pytest.mark.parametrize("last_id", ["nope", "abc.1", " ", "x.99999"])
@pytest.mark.parametrize("how", ["header", "query"])
async def test_a_reconnect_to_an_unknown_stream_gets_204_and_no_body(base_url, fake, http_client, last_id, how):
    if how == "header":
        response = await http_client.fetch(base_url + "/ask?question=q", headers={"Last-Event-ID": last_id},
                                           raise_error=False)
    else:
        response = await http_client.fetch(base_url + "/ask?resume=" + last_id.strip(), raise_error=False)
    assert response.code == 204 and response.body == b""
    assert fake.requests == []


@tuned(resume_grace=3.0)
async def test_a_reconnect_after_the_end_frame_gets_204_again_and_again(base_url, fake, http_client):
    # Node's eventsource and several Python clients reconnect after the end frame with the id of
    # the last frame they saw; each time they get 204, and no second generation.
    fake.script = Script(deltas=["one"])
    answer = await ask(base_url, "question=q", headers=OWNER)
    last_id = f"{answer.meta['stream']}.4"  # meta, update, finish, end
    assert answer.body.endswith(sse.encode_end(last_id))
    for _ in range(3):
        response = await http_client.fetch(base_url + "/ask?question=q", raise_error=False,
                                           headers={"Last-Event-ID": last_id, **OWNER})
        assert response.code == 204 and response.body == b""
    assert len(fake.requests) == 1


# -- what a connection may cost before it sends a request -----------------------------------------

async def closed_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: float,
                       trickle: bytes = b"") -> float:
    """Seconds until the server closes the connection, sending `trickle` a byte a second meanwhile."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if trickle:
            writer.write(trickle[:1])
            trickle = trickle[1:] or trickle
        try:
            data = await asyncio.wait_for(reader.read(65536), 1.0)
        except TimeoutError:
            continue
        except ConnectionResetError:
            data = b""
        if not data:
            return time.monotonic() - started
    raise AssertionError(f"still open after {limit} s")


@tuned(header_timeout=1.5, keep_alive_timeout=30.0)
async def test_a_request_head_trickled_a_byte_a_second_is_cut_at_the_header_deadline(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
    took = await closed_after(reader, writer, 10, trickle=b"abcdefgh")
    writer.close()
    assert 1.2 < took < 4


@tuned(header_timeout=1.5, keep_alive_timeout=30.0)
async def test_a_silent_connection_is_closed_at_the_header_deadline(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    took = await closed_after(reader, writer, 10)
    writer.close()
    assert 1.2 < took < 4


@tuned(header_timeout=30.0, keep_alive_timeout=1.5)
async def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):  # the timeout counts from the end of each response
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await asyncio.sleep(0.8)
    took = await closed_after(reader, writer, 10)
    writer.close()
    assert 0.2 < took < 3


def outward_address() -> str:
    """This machine's own non-loopback IPv4 address (the per-address cap spares loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # picks the route; sends nothing
            address = str(probe.getsockname()[0])
        except OSError:
            address = "127.0.0.1"
    if ipaddress.ip_address(address).is_loopback:
        pytest.skip("no non-loopback address to connect from")
    return address


@asynccontextmanager
async def outward_server(settings: Settings) -> AsyncIterator[tuple[str, int]]:
    """The server on this machine's non-loopback address: (address, port)."""
    address = outward_address()
    backend = OpenAIBackend(settings)
    server = make_server(make_app(settings, backend), settings)
    [listener] = tornado.netutil.bind_sockets(0, address)
    port = listener.getsockname()[1]
    server.add_sockets([listener])
    try:
        yield address, port
    finally:
        server.stop()
        await backend.close()  # its kept-alive upstream connections


async def test_connections_over_the_per_address_cap_get_429_and_are_closed(settings, fake):
    async with outward_server(with_settings(settings, max_connections_per_address=3)) as (address, port):
        held = [await asyncio.open_connection(address, port) for _ in range(3)]
        reader, writer = await asyncio.open_connection(address, port)
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, body = response.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n") and b"Connection: close" in head
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        held[0][1].close()
        await asyncio.sleep(0.3)
        answer = await AsyncHTTPClient().fetch(f"http://{address}:{port}/healthz")
        assert answer.code == 200  # a slot came back
        for _, w in held[1:]:
            w.close()


async def test_held_streams_count_against_the_per_address_cap_until_their_connections_close(settings, fake):
    # /ask hands its connection over once the head is out (eventsocket.py): it still counts, as
    # a held stream and then as a kept-alive connection, until it closes.
    fake.script = Script(deltas=["first", "second"], token_delay=0.5)
    async with outward_server(with_settings(settings, max_connections_per_address=2)) as (address, port):
        streams = [await asyncio.open_connection(address, port) for _ in range(2)]
        for reader, writer in streams:
            writer.write(f"GET /ask?question=q HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
            await read_until(reader, b"data: first")

        async def third() -> bytes:
            reader, writer = await asyncio.open_connection(address, port)
            writer.write(f"GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
            try:
                return await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()

        assert (await third()).startswith(b"HTTP/1.1 429 ")  # both streams held
        for reader, _ in streams:
            await read_until(reader, b"\r\n0\r\n\r\n")
        assert (await third()).startswith(b"HTTP/1.1 429 ")  # both ended, connections kept alive
        for _, writer in streams:
            writer.close()
        await asyncio.sleep(0.3)
        answer = await AsyncHTTPClient().fetch(f"http://{address}:{port}/healthz")
        assert answer.code == 200  # the slots came back


async def test_behind_a_proxy_the_per_address_cap_is_off(settings, fake):
    proxied = with_settings(settings, max_connections_per_address=2, trust_proxy_headers=True)
    async with outward_server(proxied) as (address, port):
        held = [await asyncio.open_connection(address, port) for _ in range(4)]
        answer = await AsyncHTTPClient().fetch(f"http://{address}:{port}/healthz")
        assert answer.code == 200
        for _, w in held:
            w.close()


@tuned(max_connections_per_address=2)
async def test_the_per_address_cap_spares_loopback_peers(port, base_url, http_client):
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    assert (await http_client.fetch(base_url + "/healthz")).code == 200
    for _, w in held:
        w.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_out_of_file_descriptors_the_server_pauses_accepting_logs_once_and_recovers() -> None:
    limit = 64
    proc = subprocess.Popen(
        [sys.executable, "-m", "tornado_sse", "--port", "0", "--backend", "demo",
         "--max-connections-per-address", "0"],
        env=CLEAN_ENV, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    assert proc.stderr is not None
    log: list[str] = []
    try:
        port = 0
        while not port:
            line = proc.stderr.readline()
            assert line, "server exited: " + "".join(log)
            log.append(line)
            if match := re.search(r"listening on http://[\d.]+:(\d+)/", line):
                port = int(match.group(1))
        stderr = proc.stderr
        reader = threading.Thread(target=lambda: log.extend(stderr), daemon=True)
        reader.start()
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(limit + 40)]
        time.sleep(0.5)
        before, lines = cpu_seconds(proc.pid), len(log)
        time.sleep(3)
        spent, logged = cpu_seconds(proc.pid) - before, log[lines:]
        for client in clients:
            client.close()
        assert spent < 0.5, f"{spent:.2f} s of CPU in 3 s"  # it used to spin: about 3 s
        assert len(logged) <= 2, "".join(logged[:5])
        assert sum("cannot accept connections: Too many open files" in line for line in log) == 1
        deadline = time.monotonic() + 20
        while True:  # the held sockets are gone: it serves again
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "it never served again"
                time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
