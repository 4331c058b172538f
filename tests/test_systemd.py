"""systemd notifications: datagrams to a fake NOTIFY_SOCKET, from the module and from the real
server as a process (READY, watchdog pings, STOPPING on SIGTERM)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tornado_sse.systemd import Notifier, send, socket_address

from .test_cli import CLEAN_ENV, running


class FakeSystemd:
    """A bound AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, name: str):
        self.name = name  # what goes into $NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name[1:] if name.startswith("@") else name)
        self.received: list[str] = []

    def receive(self, until: Callable[[list[str]], bool], timeout: float = 10.0) -> list[str]:
        """Messages, as they come, until `until(all so far)` holds; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while not until(self.received):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; received: {self.received}"
            self.sock.settimeout(left)
            try:
                self.received.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        return self.received

    def pending(self) -> list[str]:
        """Whatever has arrived and not been read yet, without waiting."""
        self.sock.setblocking(False)
        try:
            while True:
                self.received.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return self.received


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(tmp_path / "notify"))
    yield fake
    fake.sock.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd("@tornado-sse-test-" + secrets.token_hex(8))
    yield fake
    fake.sock.close()


def pings(messages: list[str]) -> int:
    return messages.count("WATCHDOG=1")


@pytest.mark.parametrize("name, address", [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@/org/freedesktop/systemd1/notify/123", "\0/org/freedesktop/systemd1/notify/123"),
    ("vsock:2:1234", None),
    ("relative/path", None),
], ids=["path", "abstract", "vsock", "relative"])
def test_notify_socket_names_become_path_or_abstract_addresses(name: str, address: str | None) -> None:
    assert socket_address(name) == address


def test_outside_systemd_notify_does_nothing_and_says_so() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "200000"})
    assert notifier.address is None and notifier.watchdog_interval is None
    assert notifier.notify("READY=1") is False


def test_notify_sends_one_datagram_with_one_state_per_line(systemd: FakeSystemd) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd.name})
    assert notifier.notify("READY=1", "STATUS=listening on http://127.0.0.1:8888/") is True
    assert systemd.receive(lambda got: len(got) >= 1) == ["READY=1\nSTATUS=listening on http://127.0.0.1:8888/"]


def test_notify_reaches_an_abstract_socket(abstract_systemd: FakeSystemd) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": abstract_systemd.name})
    assert notifier.notify("STOPPING=1") is True
    assert abstract_systemd.receive(lambda got: len(got) >= 1) == ["STOPPING=1"]


def test_a_socket_that_is_gone_returns_false_instead_of_raising(tmp_path: Path) -> None:
    assert Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")}).notify("READY=1") is False


def test_a_receiver_that_never_reads_never_blocks_the_sender(systemd: FakeSystemd) -> None:
    started = time.monotonic()
    sent = [send(systemd.name, "WATCHDOG=1") for _ in range(200)]
    assert time.monotonic() - started < 2
    assert sent[0] is True and False in sent  # the queue filled up, and send said so


@pytest.mark.parametrize("environ, interval", [
    ({"WATCHDOG_USEC": "200000"}, 0.1),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's watchdog
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_the_watchdog_pings_at_half_its_timeout_and_only_for_this_process(
        systemd: FakeSystemd, environ: dict[str, str], interval: float | None) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd.name, **environ})
    assert notifier.watchdog_interval == interval


def test_the_watchdog_pings_from_the_event_loop_and_stops_when_the_loop_hangs(systemd: FakeSystemd) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd.name, "WATCHDOG_USEC": "100000"})

    async def main() -> tuple[int, int, int]:
        notifier.start_watchdog()
        await asyncio.sleep(0.5)
        alive = pings(systemd.pending())
        time.sleep(0.5)  # the loop hangs: nothing may ping meanwhile
        hung = pings(systemd.pending()) - alive
        await asyncio.sleep(0.3)
        notifier.stop_watchdog()
        stopped = pings(systemd.pending())
        await asyncio.sleep(0.3)
        return alive, hung, pings(systemd.pending()) - stopped

    alive, hung, after_stop = asyncio.run(main())
    assert 3 <= alive <= 11  # every 50 ms (fewer on a loaded machine, never more)
    assert hung == 0
    assert after_stop == 0


def test_the_server_says_ready_pings_the_watchdog_and_says_stopping_on_sigterm(systemd: FakeSystemd) -> None:
    env = {**CLEAN_ENV, "NOTIFY_SOCKET": systemd.name, "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    with running("--backend", "demo", env=env) as (proc, port, _):
        got = systemd.receive(lambda got: pings(got) >= 5)
        assert got[0] == f"READY=1\nSTATUS=listening on http://127.0.0.1:{port}/"
        assert set(got[1:]) == {"WATCHDOG=1"}
        proc.send_signal(signal.SIGTERM)
        got = systemd.receive(lambda got: any(m.startswith("STOPPING=1") for m in got))
        assert "STOPPING=1\nSTATUS=draining 0 open streams" in got
        assert proc.wait(timeout=15) == 0


def test_the_server_leaves_another_process_s_watchdog_alone(systemd: FakeSystemd) -> None:
    env = {**CLEAN_ENV, "NOTIFY_SOCKET": systemd.name, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    with running("--backend", "demo", env=env) as (proc, _, _):
        systemd.receive(lambda got: len(got) >= 1)
        time.sleep(0.6)
        assert [m.split("\n")[0] for m in systemd.pending()] == ["READY=1"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
