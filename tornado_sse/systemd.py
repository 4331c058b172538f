"""systemd's service notifications, spoken directly: READY=1, STOPPING=1, STATUS= and the
watchdog ping, each one datagram to the AF_UNIX socket named in `$NOTIFY_SOCKET` (sd_notify(3)).

Outside systemd (no `$NOTIFY_SOCKET`) every call is a no-op. The watchdog pings from the event
loop itself, so a loop that hangs stops pinging and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def socket_address(name: str) -> str | None:
    """`$NOTIFY_SOCKET` as an address for connect(): a path, or `@name` for an abstract socket;
    None for anything else (systemd >= 254 also knows vsock:, which this server never runs on)."""
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None


def send(address: str, *states: str) -> bool:
    """One datagram with `states`, one per line; False when it could not be sent. Never blocks:
    a full receive queue drops the message rather than stalling the event loop."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect(address)
            sock.send("\n".join(states).encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %r: %s", address.replace("\0", "@"), exc)
        return False
    return True


class Notifier:
    """Where to send notifications (None: not under systemd), and how often to ping its watchdog
    (None: no watchdog)."""

    def __init__(self, address: str | None, watchdog_interval: float | None = None):
        self.address = address
        self.watchdog_interval = watchdog_interval if address is not None else None
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int | None = None) -> Notifier:
        """From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` (the watchdog is ours only
        when that pid is unset or is us): ping at half the watchdog's timeout, as sd_notify(3) asks."""
        name = environ.get("NOTIFY_SOCKET", "")
        address = socket_address(name) if name else None
        if name and address is None:
            log.warning("ignoring NOTIFY_SOCKET=%r: not a path or an abstract socket", name)
        interval = None
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        mine = not watchdog_pid or watchdog_pid == str(os.getpid() if pid is None else pid)
        try:
            usec = int(environ.get("WATCHDOG_USEC", "0"))
        except ValueError:
            usec = 0
        if usec > 0 and mine:
            interval = usec / 2e6
        return cls(address, interval)

    def notify(self, *states: str) -> bool:
        """Send `states` ("READY=1", "STATUS=...") as one message; False outside systemd."""
        if self.address is None:
            return False
        return send(self.address, *states)

    def start_watchdog(self) -> None:
        """Ping `WATCHDOG=1` every interval from the running loop, until `stop_watchdog()`."""
        if self.watchdog_interval is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.watchdog_interval, self._ping)

    def stop_watchdog(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _ping(self) -> None:
        assert self.watchdog_interval is not None
        self.notify("WATCHDOG=1")
        self._timer = asyncio.get_running_loop().call_later(self.watchdog_interval, self._ping)
