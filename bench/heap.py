"""What a held stream keeps on the server's Python heap: tracemalloc, snapshot difference.

    python bench/heap.py                 # 1,000 streams held at 1 tok/s
    python bench/heap.py --streams 500 --top 20

The server runs as the benchmark runs it (bench/procs.server_cmd), with tracemalloc on and a
SIGUSR1 handler that writes a snapshot: one after the warm-up, one once every stream has its first
token. Prints the difference per held stream, in bytes and blocks, then the lines that allocated
most of it. Slower than a plain run (tracemalloc records every allocation); RSS per held stream,
which this does not measure, is `bench/run.py --scenario hold5000`.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path

import procs

# Runs inside the server process: tracemalloc from the first import, snapshots on SIGUSR1.
SERVER = """
import os, signal, sys, tracemalloc, gc
tracemalloc.start(6)
out, taken = sys.argv.pop(1), []
def snapshot(*_):
    gc.collect()
    path = os.path.join(out, f"snap-{len(taken)}")
    tracemalloc.take_snapshot().dump(path + ".tmp")
    os.replace(path + ".tmp", path)  # whole, or not there yet
    taken.append(1)
    print("snapshot", len(taken), file=sys.stderr, flush=True)
signal.signal(signal.SIGUSR1, snapshot)
from tornado_sse.cli import main
main()
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--top", type=int, default=12, help="allocating lines to show")
    args = p.parse_args()
    py, logs = sys.executable, Path(tempfile.mkdtemp(prefix="heap-"))
    up = procs.start([py, str(procs.BENCH / "upstream.py"), "--tokens", "100", "--token-delay", "1"],
                     logs / "upstream.log", stdout_pipe=True)
    srv = loadgen = None
    try:
        up_port = int(procs.read_line(up, 20).split()[1])
        port = procs.free_port()
        cmd = procs.server_cmd("tornado-sse", port)
        srv = procs.start([py, "-c", SERVER, str(logs), *cmd[3:]], logs / "server.log",
                          env={**os.environ, "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
                               "OPENAI_API_KEY": "bench"})
        procs.wait_http(port, "/healthz", timeout=120)  # imports are slow under tracemalloc
        warm = procs.start([py, str(procs.BENCH / "loadgen.py"), "--port", str(port), "--streams", "20",
                            "--timeout", "20", "--hold", "1"], logs / "warmup.log", stdout_pipe=True)
        warm.wait(60)
        snapshot(srv.pid, logs / "snap-0")
        loadgen = procs.start([py, str(procs.BENCH / "loadgen.py"), "--port", str(port), "--streams",
                               str(args.streams), "--ramp", "1", "--timeout", "120", "--hold", "10"],
                              logs / "loadgen.log", stdout_pipe=True)
        if not procs.read_line(loadgen, 150).startswith("READY"):
            raise RuntimeError(f"the streams did not all start (see {logs})")
        # READY also comes when loadgen's wait times out: count the streams the server holds.
        held = re.search(rb"^tornado_sse_active_streams (\S+)$", urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=30).read(), re.M)
        if held is None or float(held.group(1)) != args.streams:
            raise RuntimeError(f"the server holds {held and held.group(1)!r} streams, not {args.streams}")
        snapshot(srv.pid, logs / "snap-1")
    finally:
        for proc in (loadgen, srv, up):
            if proc is not None:
                procs.stop(proc, grace=3)
    report(logs / "snap-0", logs / "snap-1", args.streams, args.top)


def snapshot(pid: int, path: Path) -> None:
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"no snapshot at {path}"
        time.sleep(0.2)


def report(before: Path, after: Path, streams: int, top: int) -> None:
    skip = [tracemalloc.Filter(False, tracemalloc.__file__)]
    a = tracemalloc.Snapshot.load(str(before)).filter_traces(skip)
    b = tracemalloc.Snapshot.load(str(after)).filter_traces(skip)
    lines = b.compare_to(a, "lineno")
    size, count = sum(s.size_diff for s in lines), sum(s.count_diff for s in lines)
    print(f"{streams:,} held streams: {size / streams:,.0f} B in {count / streams:.1f} blocks a stream")
    for s in lines[:top]:
        frame = s.traceback[0]
        where = frame.filename.split("site-packages/")[-1].replace(str(procs.ROOT) + "/", "")
        print(f"  {s.size_diff / streams:7,.0f} B {s.count_diff / streams:5.1f} blocks  {where}:{frame.lineno}")


if __name__ == "__main__":
    main()
