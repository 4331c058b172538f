"""Upstream silence limits: one timer per stream, and a float store per token to feed it."""

from __future__ import annotations

import asyncio
from types import TracebackType

from .errors import UpstreamTimeout


class Watchdog:
    """Cancel the current task when the upstream is silent too long, and say why.

    `first` bounds the wait for the first token (request, headers and all), `idle` every silence
    after it. `touch()` only stores the time: the timer re-arms itself lazily when it fires early,
    so the per-token cost is one attribute store instead of a timer heap operation. It is first
    armed for the shorter of the two limits, so the first token need not re-arm it either.
    """

    def __init__(self, first: float, idle: float):
        self._first = first
        self._idle = idle
        self._limit = first
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._expired = False
        self._started = False
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._held: asyncio.Future[None] | None = None

    def touch(self) -> None:
        """A token arrived."""
        self._last = self._loop.time()
        if not self._started:  # from now on the idle limit applies
            self._started = True
            self._limit = self._idle

    def hold(self, ready: asyncio.Future[None]) -> None:
        """The browser is behind: the upstream is not read until `ready` (which --send-timeout
        bounds), and that wait is not the upstream's silence."""
        self._held = ready
        ready.add_done_callback(self._release)

    def _release(self, ready: asyncio.Future[None]) -> None:
        if ready is self._held:
            self._held = None
            self._last = self._loop.time()

    def _check(self) -> None:
        due = self._last + self._limit
        if self._held is not None:
            self._timer = self._loop.call_at(self._loop.time() + self._limit, self._check)
        elif self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
        elif self._task is not None:
            self._expired = True
            self._task.cancel()

    async def __aenter__(self) -> Watchdog:
        self._task = asyncio.current_task()
        # Due no later than either limit would be: _check waits on for whichever applies.
        self._timer = self._loop.call_at(self._last + min(self._first, self._idle), self._check)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._expired and exc_type is asyncio.CancelledError and self._task is not None:
            self._task.uncancel()
            phase = "next token" if self._started else "first token"
            raise UpstreamTimeout(phase, self._limit) from exc
