"""The load generator: many `GET /ask` SSE streams on raw asyncio Protocols, one process.

    python bench/loadgen.py --port 8888 --streams 100 --ramp 1
    python bench/loadgen.py --port 8888 --streams 200 --steps 10,20,40 --latency-limit-ms 50

Each stream is one HTTP/1.1 connection parsed incrementally (status line, headers, chunked body,
SSE lines). Every `update` frame's data holds upstream send stamps (`time.monotonic_ns()`), so the
relay latency of a token is the receipt time minus its stamp. Prints `READY` once every stream has
its first token (or has failed), then one JSON line with the results. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

END = b"<END_STREAMING_SSE>"


@dataclass
class Run:
    """What all the streams of one run share: the latency samples and the outcome counters."""

    drop_after: int = 0  # >0: close the connection after this many tokens
    latencies: list[int] = field(default_factory=list)  # ns, one per token in the steady window
    early: list[int] = field(default_factory=list)  # ns, tokens before it (streams still opening)
    measuring: bool = False  # the steady window: every stream open, plus a moment to settle
    protocols: list[SSEStream] = field(default_factory=list)
    ttft: list[int] = field(default_factory=list)  # ns, one per stream with a first token
    outcomes: Counter[str] = field(default_factory=Counter)
    closed_at: dict[str, float] = field(default_factory=dict)  # question -> time.monotonic()
    rates: list[float] = field(default_factory=list)  # tokens/s of each completed stream
    tokens: int = 0
    open_streams: int = 0  # streams with a first token or an outcome
    all_open: asyncio.Event = field(default_factory=asyncio.Event)
    target: int = 0


class SSEStream(asyncio.Protocol):
    def __init__(self, run: Run, question: str, request: bytes, done: asyncio.Future[str]):
        self.run, self.question, self.request, self.done = run, question, request, done
        run.protocols.append(self)
        self.transport: asyncio.Transport | None = None
        self.sent_ns = 0
        self.headers_done = False
        self.chunked = False
        self.buf = bytearray()
        self.chunk_left = 0
        self.skip = 0
        self.tail = b""
        self.event = b"message"
        self.data: list[bytes] = []
        self.tokens = 0
        self.first_ns = self.last_ns = 0
        self.error = False
        self.counted_open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sent_ns = time.monotonic_ns()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def finish(self, outcome: str) -> None:
        if self.done.done():
            return
        self.done.set_result(outcome)
        self.run.outcomes[outcome] += 1
        if outcome == "completed" and self.tokens > 1 and self.last_ns > self.first_ns:
            self.run.rates.append((self.tokens - 1) * 1e9 / (self.last_ns - self.first_ns))
        self.mark_open()
        if self.transport is not None:
            self.transport.close()

    def mark_open(self) -> None:
        if not self.counted_open:
            self.counted_open = True
            self.run.open_streams += 1
            if self.run.open_streams >= self.run.target:
                self.run.all_open.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish("closed_early")

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.buf
        buf += data
        if not self.headers_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[:end + 4]
            self.headers_done = True
            if not head.startswith(b"http/1.1 200"):
                self.finish("http_" + head[9:12].decode("ascii", "replace"))
                return
            self.chunked = b"transfer-encoding: chunked" in head
        if not self.chunked:
            self.feed(bytes(buf), now)
            buf.clear()
            return
        while buf and not self.done.done():
            if self.chunk_left:
                take = min(len(buf), self.chunk_left)
                self.feed(bytes(buf[:take]), now)
                del buf[:take]
                self.chunk_left -= take
                if not self.chunk_left:
                    self.skip = 2
            elif self.skip:
                n = min(self.skip, len(buf))
                del buf[:n]
                self.skip -= n
            else:
                i = buf.find(b"\r\n")
                if i < 0:
                    return
                size = int(bytes(buf[:i]).split(b";")[0], 16)
                del buf[:i + 2]
                if size == 0:
                    self.finish("error_event" if self.error else "no_end_frame")
                    return
                self.chunk_left = size

    def feed(self, payload: bytes, now: int) -> None:
        lines = (self.tail + payload).split(b"\n") if self.tail else payload.split(b"\n")
        self.tail = lines.pop()
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self.data:
                    self.dispatch(b"\n".join(self.data), now)
                    self.data = []
                self.event = b"message"
            elif line.startswith(b"data:"):
                self.data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            elif line.startswith(b"event:"):
                self.event = line[6:].strip()

    def dispatch(self, data: bytes, now: int) -> None:
        run = self.run
        if self.event == b"error":
            self.error = True
        elif self.event != b"update" or self.done.done():
            return
        elif data == END:
            self.finish("error_event" if self.error else "completed")
        else:
            stamps = data.split()
            if not self.tokens:
                self.first_ns = now
                run.ttft.append(now - self.sent_ns)
                self.mark_open()
            samples = run.latencies if run.measuring else run.early
            for stamp in stamps:
                samples.append(now - int(stamp))
            self.tokens += len(stamps)
            run.tokens += len(stamps)
            self.last_ns = now
            if run.drop_after and self.tokens >= run.drop_after:
                run.closed_at[self.question] = time.monotonic()
                self.finish("dropped")


def pct(values: list[int] | list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return float(s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))])


async def run_streams(host: str, port: int, streams: int, *, ramp: float = 0.0, drop_after: int = 0,
                      timeout: float = 60.0, prefix: str = "q", ready: bool = False, hold: float = 0.0,
                      settle: float = 0.25) -> dict[str, Any]:
    """Open `streams` streams spread evenly over `ramp` seconds; wait for all, at most `timeout`.

    Relay latency counts from `settle` seconds after every stream has its first token (the steady
    window); earlier tokens are reported apart. With `hold`, the streams are closed `hold` seconds
    into the steady window (outcome "held") instead of being read to their end.
    """
    loop = asyncio.get_running_loop()
    run = Run(drop_after=drop_after, target=streams)
    futures: list[asyncio.Future[str]] = []
    cpu0 = _cpu()
    t0 = time.monotonic()

    async def open_one(i: int) -> None:
        question = f"{prefix}{i}"
        request = (f"GET /ask?question={question} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                   "Accept: text/event-stream\r\n\r\n").encode()
        done = futures[i]
        try:
            await loop.create_connection(lambda: SSEStream(run, question, request, done), host, port)
        except OSError as exc:
            if not done.done():
                done.set_result("connect_" + type(exc).__name__)
                run.outcomes["connect_" + type(exc).__name__] += 1
                run.open_streams += 1
                if run.open_streams >= run.target:
                    run.all_open.set()

    futures = [loop.create_future() for _ in range(streams)]
    starters: list[asyncio.Task[None]] = []
    for i in range(streams):
        delay = t0 + ramp * i / streams - time.monotonic()
        if delay > 0.001:
            await asyncio.sleep(delay)
        starters.append(loop.create_task(open_one(i)))
    try:
        await asyncio.wait_for(run.all_open.wait(), max(0.1, t0 + timeout - time.monotonic()))
    except TimeoutError:
        pass
    all_open_s = time.monotonic() - t0
    if ready:
        print("READY", run.open_streams, flush=True)
    await asyncio.wait(futures, timeout=settle)
    run.measuring = True
    if hold:
        await asyncio.wait(futures, timeout=min(hold, max(0.1, t0 + timeout - time.monotonic())))
        for proto in run.protocols:
            proto.finish("held")
    _, pending = await asyncio.wait(futures, timeout=max(0.1, t0 + timeout - time.monotonic()))
    for fut in pending:
        fut.set_result("timeout")
        run.outcomes["timeout"] += 1
    for task in starters:
        task.cancel()
    wall = time.monotonic() - t0
    ms = 1e-6
    return {
        "streams": streams,
        "outcomes": dict(run.outcomes),
        "completed": run.outcomes["completed"],
        "failed": streams - run.outcomes["completed"] - run.outcomes["dropped"] - run.outcomes["held"],
        "tokens": run.tokens,
        # the sum of each completed stream's own rate (first to last token): the aggregate rate
        # the server sustains while streams are open, not diluted by the ramp and the set-up
        "tokens_per_s": sum(run.rates) if run.rates else None,
        "latency_ms": {f"p{p}": _scale(pct(run.latencies, p), ms) for p in (50, 90, 99, 100)},
        "latency_steady_samples": len(run.latencies),
        "latency_early_ms": {f"p{p}": _scale(pct(run.early, p), ms) for p in (50, 90, 99, 100)},
        "all_open_s": all_open_s,
        "ttft_ms": {f"p{p}": _scale(pct(run.ttft, p), ms) for p in (50, 90, 99, 100)},
        "closed_at": run.closed_at,
        "wall_s": wall,
        "loadgen_cpu_s": _cpu() - cpu0,
    }


def _scale(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def lag_monitor(samples: list[float], stop: asyncio.Event) -> None:
    """How late a 10 ms timer fires: when it is late, the load generator itself is busy."""
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(0.01)
        samples.append((time.monotonic() - t - 0.01) * 1000)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    lag: list[float] = []
    stop = asyncio.Event()
    monitor = asyncio.ensure_future(lag_monitor(lag, stop))
    result: dict[str, Any]
    if args.steps:
        steps = []
        for rate in [int(s) for s in args.steps.split(",")]:
            tokens = int(rate * (args.ramp + 0.5 + args.step_seconds)) + 1
            step = await run_streams(args.host, args.port, args.streams, ramp=args.ramp,
                                     timeout=args.timeout, prefix=f"r{rate}x{tokens}_")
            step["rate"] = rate
            step["loop_lag_ms_p99"] = pct(lag, 99)
            lag.clear()
            steps.append(step)
            p99 = step["latency_ms"]["p99"]
            if step["failed"] or p99 is None or p99 > args.latency_limit_ms:
                break
            await asyncio.sleep(0.5)  # let the last streams' connections close
        result = {"steps": steps, "latency_limit_ms": args.latency_limit_ms}
    else:
        result = await run_streams(args.host, args.port, args.streams, ramp=args.ramp,
                                   drop_after=args.drop_after, timeout=args.timeout, ready=True,
                                   hold=args.hold)
    stop.set()
    await monitor
    result["loop_lag_ms"] = {"p99": pct(lag, 99), "max": pct(lag, 100)}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--ramp", type=float, default=0.0, help="seconds over which streams are opened")
    p.add_argument("--drop-after", type=int, default=0, help="close each stream after N tokens")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a run may take at most")
    p.add_argument("--hold", type=float, default=0.0, help="close every stream this many s into the steady window")
    p.add_argument("--steps", default="", help="saturation: comma-separated tokens/s per stream")
    p.add_argument("--step-seconds", type=float, default=2.5, help="saturation: steady seconds per step")
    p.add_argument("--latency-limit-ms", type=float, default=50.0, help="saturation: stop above this p99")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not args.no_uvloop:
        try:
            import uvloop
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass
    result = asyncio.run(main_async(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
