"""Time as the controller sees it: a monotonic reading, wall time, and timers.

Injected everywhere time matters (backoff, grace periods, resync), so tests drive time by hand
instead of sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def now(self) -> datetime: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle: ...


class LoopClock:
    """The real clock: the event loop's monotonic time and timers, and UTC wall time."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback)


class _ManualTimer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when told to; `advance` fires due timers in order."""

    def __init__(self, start: datetime | None = None) -> None:
        self._monotonic = 0.0
        self._wall = start or datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._sequence = itertools.count()

    def monotonic(self) -> float:
        return self._monotonic

    def now(self) -> datetime:
        return self._wall

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        timer = _ManualTimer(callback)
        heapq.heappush(self._timers, (self._monotonic + max(0.0, delay), next(self._sequence), timer))
        return timer

    def advance(self, seconds: float) -> None:
        target = self._monotonic + seconds
        while self._timers and self._timers[0][0] <= target:
            due, _, timer = heapq.heappop(self._timers)
            self._set(due)
            if not timer.cancelled:
                timer.callback()
        self._set(target)

    def _set(self, monotonic: float) -> None:
        self._wall += timedelta(seconds=monotonic - self._monotonic)
        self._monotonic = monotonic
