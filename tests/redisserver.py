"""A real redis-server (Debian's package) on a free port, for the tests of `--store redis://`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def redis_server_path() -> str:
    """redis-server's path; missing, the test skips on a developer machine and fails in CI."""
    path = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: .ci/run must install it")
        pytest.skip("redis-server is not installed")
    return path


def _version() -> int:
    out = subprocess.run([redis_server_path(), "--version"], capture_output=True, text=True).stdout
    return int(out.split("v=", 1)[1].split(".", 1)[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process, without persistence; `kill()` and `start()` again on the same
    port to take it away and bring it back."""

    def __init__(self, port: int | None = None, password: str | None = None):
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_server_path(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--loglevel", "warning",
             # DEBUG SLEEP makes it slow in a test; Redis 7 refuses DEBUG unless enabled
             *(["--enable-debug-command", "local"] if _version() >= 7 else []),
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, "redis-server exited"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # it answers
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def command(self, *args: str) -> None:
        """Send one command and do not wait for its answer (DEBUG SLEEP makes Redis slow)."""
        auth = f"AUTH {self.password}\r\n" if self.password else ""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall((auth + " ".join(args) + "\r\n").encode())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()
