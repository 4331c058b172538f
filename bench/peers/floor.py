"""The floor: a raw-asyncio `/ask` relay written for nothing else, the least a Python relay can cost.

    OPENAI_BASE_URL=http://127.0.0.1:9000/v1 OPENAI_API_KEY=bench python bench/peers/floor.py --port 8891

asyncio Protocols on both sides, the standard event loop (as tornado-sse runs on), HTTP/1.1 parsed
minimally: the request line and the end of the head from the browser; the status line, the headers'
end and the chunked framing from the upstream. Per upstream chunk, `json.loads` of every `data:`
line; per token, one socket write of one chunk holding one `event: update` frame; then the same end
frame as tornado-sse and the last chunk. A kept-alive upstream connection goes back to a per-process
idle list when its answer was read to the end. Nothing else: no ids, no padding, no meta or finish
frames, no limits, no logging, no retries, no timeouts. A benchmark yardstick, not a server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import urllib.parse

END = b"event: update\ndata: <END_STREAMING_SSE>\n\n"
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Upstream:
    """Where to connect and the request head every stream shares."""

    def __init__(self, base_url: str, api_key: str):
        url = urllib.parse.urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.head = (f"POST {url.path.rstrip('/')}/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
                     f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
                     f"Accept: text/event-stream\r\nContent-Length: ").encode()
        self.idle: list[UpstreamConnection] = []

    def request(self, question: str) -> bytes:
        body = json.dumps({"model": "gpt-4o-mini", "stream": True, "max_tokens": 1024,
                           "messages": [{"role": "user", "content": question}]}).encode()
        return self.head + str(len(body)).encode() + b"\r\n\r\n" + body


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection: status line, head, chunked body, SSE `data:` lines -> the client."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.reset()

    def reset(self) -> None:
        self.buf = bytearray()
        self.head_done = False
        self.chunk_left = -1  # -1: a chunk-size line comes next
        self.lines = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, client: Client, request: bytes) -> None:
        self.client = client
        self.reset()
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 200"):
                self.end(reusable=False)
                return
            del buf[:end + 4]
            self.head_done = True
        while buf:
            if self.chunk_left < 0:
                i = buf.find(b"\r\n")
                if i < 0:
                    return
                size = int(bytes(buf[:i]).split(b";")[0], 16)
                del buf[:i + 2]
                if size == 0:
                    self.end(reusable=True)
                    return
                self.chunk_left = size
            if self.chunk_left > 0:
                take = min(len(buf), self.chunk_left)
                self.lines += buf[:take]
                del buf[:take]
                self.chunk_left -= take
            if self.chunk_left == 0:
                if len(buf) < 2:
                    break
                del buf[:2]
                self.chunk_left = -1
        self.relay()

    def relay(self) -> None:
        lines = self.lines
        while (i := lines.find(b"\n")) >= 0:
            line = bytes(lines[:i]).rstrip(b"\r")
            del lines[:i + 1]
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                continue
            chunk = json.loads(payload)
            choices = chunk.get("choices")
            text = choices[0].get("delta", {}).get("content") if choices else None
            if text and self.client is not None:
                self.client.token(text)

    def end(self, reusable: bool) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.done()
        if reusable and self.transport is not None and not self.transport.is_closing():
            self.upstream.idle.append(self)
        elif self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.upstream.idle:
            self.upstream.idle.remove(self)
        client, self.client = self.client, None
        if client is not None:
            client.done()

    def abort(self) -> None:
        self.client = None
        if self.transport is not None:
            self.transport.close()


class Client(asyncio.Protocol):
    """One browser connection: a request head, then (for /ask) the event stream."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.conn: UpstreamConnection | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.streaming:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        target = self.buf[:self.buf.find(b"\r\n")].split(b" ")[1].decode("latin-1")
        self.buf = self.buf[end + 4:]
        path, _, query = target.partition("?")
        assert self.transport is not None
        if path == "/healthz":
            self.transport.write(OK)
        elif path == "/ask":
            question = urllib.parse.parse_qs(query).get("question", [""])[0]
            self.streaming = True
            self.transport.write(HEAD)
            asyncio.ensure_future(self.ask(question))
        else:
            self.transport.write(NOT_FOUND)
            self.transport.close()

    async def ask(self, question: str) -> None:
        up = self.upstream
        request = up.request(question)
        conn = up.idle.pop() if up.idle else None
        if conn is None:
            try:
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: UpstreamConnection(up), up.host, up.port)
            except OSError:
                self.done()
                return
        if self.transport is None or self.transport.is_closing():
            conn.abort()
            return
        self.conn = conn
        conn.send(self, request)

    def token(self, text: str) -> None:
        frame = ("event: update\ndata: " + text.replace("\n", "\ndata: ") + "\n\n").encode()
        assert self.transport is not None
        self.transport.write(b"%x\r\n%b\r\n" % (len(frame), frame))  # one write per token

    def done(self) -> None:
        self.conn = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(END), END))
        self.streaming = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.conn is not None:
            self.conn.abort()  # the upstream sees its connection closed at once
            self.conn = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8891)
    args = p.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    upstream = Upstream(os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:9000/v1"),
                        os.environ.get("OPENAI_API_KEY", "no-key"))

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(
            lambda: Client(upstream), args.host, args.port, backlog=4096)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
