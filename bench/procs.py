"""Processes for the benchmark: start and stop them, and read their CPU time and memory from /proc."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> None:
    """preexec_fn of every child: the soft limit on open files up to the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat (fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak RSS) from /proc/PID/status, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class RssSampler:
    """Highest VmRSS of a process, sampled every `interval` seconds on a thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval, self.max_kib = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.max_kib = max(self.max_kib, memory_kib(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=2)
        return self.max_kib


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None,
          stdout_pipe: bool = False) -> subprocess.Popen[str]:
    """Start `cmd` in bench/ (so `-m tornado_sse` imports from PYTHONPATH or the installed
    package, not from the work tree by accident) with the raised file limit; stderr (and stdout
    unless piped) to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = log.open("a")
    return subprocess.Popen(cmd, cwd=BENCH, env={**os.environ, **(env or {})}, text=True,
                            stdout=subprocess.PIPE if stdout_pipe else handle, stderr=handle,
                            preexec_fn=raise_nofile)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next stdout line of `proc`, or "" after `timeout` seconds (then the process is killed)."""
    timer = threading.Timer(timeout, lambda: stop(proc, grace=0))
    timer.start()
    try:
        assert proc.stdout is not None
        return proc.stdout.readline()
    finally:
        timer.cancel()


def wait_http(port: int, path: str, timeout: float = 20.0) -> None:
    """Poll `GET path` until it answers 200; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port} within {timeout} s")


def stop(proc: subprocess.Popen[str], grace: float = 6.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; only this one process, by its id."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM if grace else signal.SIGKILL)
            proc.wait(timeout=grace or 5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass


# tornado-sse-redis: the same server with --store on a redis-server of its own (started per
# measurement by run.py); a shared store needs a shared session secret.
BENCH_SECRET = "bench-Zq7xV2mK9pL4wR8tN3bY6cH1"


def server_cmd(side: str, port: int, extra: list[str] | None = None,
               redis_port: int | None = None) -> list[str]:
    if side.startswith("tornado-sse"):
        store = ["--store", f"redis://127.0.0.1:{redis_port}/0", "--session-secret",
                 BENCH_SECRET] if side == "tornado-sse-redis" else []
        return [sys.executable, "-m", "tornado_sse", "--host", "127.0.0.1", "--port", str(port),
                "--backend", "openai", "--max-retries", "0", "--log-level", "warning",
                # the peer has no rate limit or stream cap: measure the relay, not the limits
                "--rate-limit", "0", "--max-streams", "100000", *store, *(extra or [])]
    if side == "floor":
        return [sys.executable, str(BENCH / "peers" / "floor.py"), "--port", str(port)]
    return [sys.executable, str(BENCH / "peers" / "fastapi_peer.py"), "--port", str(port)]
