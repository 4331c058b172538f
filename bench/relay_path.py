"""CPU a token costs on the relay's push path, in one process, without the network's noise.

    python bench/relay_path.py                    # 200,000 tokens, 5 rounds
    PYTHONPATH=<a git archive> python bench/relay_path.py   # an older commit (2cc7311 or later)

One chat chunk a read, as the benchmark's upstream sends them (chunked, `data: {json}`), fed to an
upstream connection's `data_received`; from there the real path: llhttp, the pump, ChatChunks,
Stream.deliver (id, padding), EventSocket.push and one `send()` to a socketpair that is drained
every 64 tokens. The server's own defaults (padding on). Process CPU time per token, median of the
rounds; about half of it is the `send()`. A Unix socketpair's send() is cheaper than the server's
TCP loopback one (about 7 against 10 us a token in all): good for A/B runs of the Python path, not
for absolute numbers, which are `bench/run.py --scenario steady100`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time

from tornado.iostream import IOStream

from tornado_sse.backend import ChatChunks
from tornado_sse.connection import _Connection
from tornado_sse.conversations import Conversation
from tornado_sse.demo import _chunk
from tornado_sse.eventsocket import EventSocket, Pinger
from tornado_sse.registry import StreamRegistry
from tornado_sse.settings import Settings
from tornado_sse.store import MemoryStore
from tornado_sse.streams import Stream
from tornado_sse.watchdog import Watchdog


class _Upstream(asyncio.Transport):
    """Stands in for the upstream socket: the bytes come from the loop below."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


async def tokens(n: int) -> float:
    settings = Settings()
    registry = StreamRegistry(None, MemoryStore(settings), max_streams=1,  # type: ignore[arg-type]
                              resume_grace=settings.resume_grace,
                              resume_buffer=settings.resume_buffer, pad_frames=settings.pad_frames)
    ours, browser = socket.socketpair()
    browser.setblocking(False)
    socket_ = EventSocket(IOStream(ours), None, chunked=True, keep_alive=False, send_timeout=10,
                          pinger=Pinger(3600), log_access=lambda: None)
    stream = Stream(registry, Conversation("bench"), "q")
    stream.listener = socket_
    conn = _Connection()
    conn.connection_made(_Upstream())
    conn.start()
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    await conn.read_head()
    conn.pump(ChatChunks(stream.deliver, Watchdog(3600, 3600)))
    body = _chunk("gpt-4o-mini", {"content": "tok "}, usage=True)
    read = b"%x\r\n%b\r\n" % (len(body), body)
    started = time.process_time()
    for i in range(n):
        conn.data_received(read)
        if i % 64 == 0:
            try:
                while browser.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
    took = time.process_time() - started
    socket_.lost()
    browser.close()
    return took / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    runs = [asyncio.run(tokens(args.tokens)) for _ in range(args.rounds)]
    print(f"{statistics.median(runs):.2f} us of CPU a token (median of {args.rounds} x "
          f"{args.tokens:,}; rounds {', '.join(f'{r:.2f}' for r in runs)})")


if __name__ == "__main__":
    main()
