"""The benchmark's upstream: tornado_sse.demo's FakeUpstream with a stats route and a big backlog.

    python bench/upstream.py --port 0 --tokens 250 --token-delay 0.02

It prints `READY <port>` once it listens. Around the demo's handler it adds:

- `GET /_stats`: requests, completed streams, and for every client that went away its question
  (the load generator's stream id), when the close was seen (`time.monotonic()`, comparable across
  processes) and when each chunk was written, so the harness can tell how long after the load
  generator's close the upstream saw it and how many chunks it wrote in between.
- a question starting with `warmup` gets a one-token answer, whatever the script says, and one
  starting with `r<R>x<N>_` gets N tokens at R tokens/s (the saturation steps).
- a listen backlog of 4,096 instead of Tornado's 128, so that 2,000 connections at once measure the
  server under test and not this process.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import resource
import socket
import time
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from tornado_sse.demo import ChatCompletionsHandler, FakeUpstream, Script

RATE = re.compile(r"r(\d+)x(\d+)_")
GONE: list[dict[str, Any]] = []  # one record per client that went away mid-stream


def raise_nofile() -> None:
    """Lift the soft limit on open files to the hard limit (thousands of sockets per process)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class BenchHandler(ChatCompletionsHandler):
    def initialize(self, fake: FakeUpstream) -> None:  # type: ignore[override]
        super().initialize(fake)
        self.question = ""
        self.write_times: list[float] = []

    async def post(self) -> None:
        try:
            messages = json.loads(self.request.body).get("messages") or [{}]
            self.question = str(messages[-1].get("content", ""))
        except (ValueError, AttributeError):
            pass
        await super().post()

    def deltas(self, script: Script, body: dict[str, Any]) -> list[str | dict[str, Any] | bytes]:
        if self.question.startswith("warmup"):
            return ["warm "]
        if m := RATE.match(self.question):
            return [f"tok{i} " for i in range(int(m[2]))]
        return super().deltas(script, body)

    async def stream(self, script: Script, model: str, deltas: list[str | dict[str, Any] | bytes]) -> None:
        if m := RATE.match(self.question):
            script = dataclasses.replace(script, token_delay=1 / int(m[1]))
        await super().stream(script, model, deltas)

    async def send(self, data: bytes) -> None:
        self.write_times.append(time.monotonic())
        await super().send(data)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        GONE.append({"question": self.question, "seen": self.fake.disconnects[-1].at,
                     "chunks_written": self.chunks_written, "write_times": self.write_times})


class StatsHandler(tornado.web.RequestHandler):
    def initialize(self, fake: FakeUpstream) -> None:
        self.fake = fake

    def get(self) -> None:
        self.finish({"requests": len(self.fake.requests), "completed": self.fake.completed,
                     "gone": GONE})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--first-token-delay", type=float, default=0.0)
    p.add_argument("--token-delay", type=float, default=0.02)
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--no-uvloop", action="store_true", help="plain asyncio loop (default: uvloop)")
    args = p.parse_args()
    raise_nofile()
    fake = FakeUpstream(Script(tokens=args.tokens, stamp=True, first_token_delay=args.first_token_delay,
                               token_delay=args.token_delay))
    fake.requests = _CountOnly()  # type: ignore[assignment]  # bodies are not needed, only the count
    app = tornado.web.Application([(r"/v1/chat/completions", BenchHandler, {"fake": fake}),
                                   (r"/_stats", StatsHandler, {"fake": fake})],
                                  log_function=lambda handler: None)

    async def serve() -> None:
        [sock] = tornado.netutil.bind_sockets(args.port, args.host, family=socket.AF_INET,
                                              backlog=args.backlog)
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets([sock])
        print(f"READY {sock.getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    if not args.no_uvloop:
        try:
            import uvloop
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass
    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


class _CountOnly(list):  # type: ignore[type-arg]
    """A list that only counts what is appended (the fake keeps every request body otherwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def append(self, item: object) -> None:
        self.count += 1

    def __len__(self) -> int:
        return self.count


if __name__ == "__main__":
    main()
