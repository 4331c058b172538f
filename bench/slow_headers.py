"""The slow-headers attack, on loopback, bounded in sockets and time: N sockets each send up to
--header-bytes of header lines without the blank line that ends a request head, then one byte
every --trickle seconds. Meanwhile, once a second, a /healthz from another loopback address
(127.0.0.2, so a per-address cap on the attackers does not refuse it) measures what everyone
else gets. Prints the server's CPU, its resident memory, the /healthz latency, and when the
attack sockets were closed.

    python bench/slow_headers.py                                   # this checkout
    python bench/slow_headers.py --source /tmp/old-checkout        # another version of the server
    python bench/slow_headers.py --server-arg=--max-connections-per-address --server-arg=0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import threading
import time


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        kib = re.search(r"VmRSS:\s+(\d+) kB", status.read())
    return int(kib.group(1)) / 1024 if kib else 0.0


async def attacker(port: int, header_bytes: int, trickle: float, until: float, closed: list[float],
                   started: float) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        closed.append(0.0)
        return
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        while sent < header_bytes and time.monotonic() < until:
            writer.write(line)
            sent += len(line)
            await asyncio.wait_for(writer.drain(), max(0.1, until - time.monotonic()))
        writer.write(b"X-Slow: ")
        while time.monotonic() < until:
            try:  # the server answering or closing ends the read; silence is the normal case
                if await asyncio.wait_for(reader.read(65536), trickle) == b"":
                    raise ConnectionError
            except TimeoutError:
                pass
            writer.write(b"a")
            await writer.drain()
    except (OSError, ConnectionError, TimeoutError):
        closed.append(time.monotonic() - started)
    finally:
        writer.close()


async def healthz(port: int) -> float:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]
    return time.monotonic() - started


async def attack(args: argparse.Namespace, pid: int, port: int) -> None:
    started = time.monotonic()
    until = started + args.seconds
    closed: list[float] = []
    cpu0, rss0 = cpu_seconds(pid), rss_mib(pid)
    tasks = [asyncio.ensure_future(attacker(port, args.header_bytes, args.trickle, until, closed, started))
             for _ in range(args.sockets)]
    latencies: list[float] = []
    rss_max = rss0
    while time.monotonic() < until:
        tick = time.monotonic()
        try:
            latencies.append(await asyncio.wait_for(healthz(port), max(1.0, until - tick)))
        except (TimeoutError, OSError, AssertionError) as exc:
            print(f"  /healthz failed at {tick - started:.0f}s: {exc!r}")
        rss_max = max(rss_max, rss_mib(pid))
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    cpu = cpu_seconds(pid) - cpu0
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    refused = sum(1 for t in closed if t < 1.0)
    print(f"sockets {args.sockets}, {args.header_bytes // 1024} KiB of headers each, a byte every "
          f"{args.trickle:g} s, {elapsed:.0f} s")
    print(f"server CPU          {cpu:.1f} s ({100 * cpu / elapsed:.0f} % of one core)")
    print(f"resident memory     {rss0:.0f} MiB -> max {rss_max:.0f} MiB")
    if latencies:
        print(f"/healthz latency    p50 {1000 * statistics.median(latencies):.0f} ms, "
              f"max {1000 * max(latencies):.0f} ms ({len(latencies)} probes)")
    print(f"attack sockets      {len(closed)} closed by the server ({refused} within 1 s), "
          f"{args.sockets - len(closed)} still open at the end")
    if closed:
        print(f"                    closed at p50 {statistics.median(closed):.1f} s, max {max(closed):.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sockets", type=int, default=200)
    p.add_argument("--header-bytes", type=int, default=1024 * 1024)
    p.add_argument("--trickle", type=float, default=3.0, help="seconds between bytes")
    p.add_argument("--seconds", type=float, default=40.0, help="how long the attack lasts")
    p.add_argument("--source", help="run the server from this checkout (PYTHONPATH)")
    p.add_argument("--server-arg", action="append", default=[])
    args = p.parse_args()
    assert args.sockets <= 2000 and args.seconds <= 600, "bounded on purpose"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    if args.source:
        env["PYTHONPATH"] = args.source
    proc = subprocess.Popen([sys.executable, "-m", "tornado_sse", "--backend", "demo", "--port", "0",
                             "--host", "127.0.0.1", *args.server_arg],
                            env=env, stderr=subprocess.PIPE, text=True,
                            cwd=args.source)  # -m imports from the working directory first
    assert proc.stderr is not None
    try:
        while not (match := re.search(r"listening on http://[\d.]+:(\d+)/", proc.stderr.readline())):
            assert proc.poll() is None, "the server did not start"
        stderr = proc.stderr  # keep reading its log, so that it never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()
        asyncio.run(attack(args, proc.pid, int(match.group(1))))
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
