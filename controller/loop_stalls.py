"""Timeouts that a stalled event loop does not trip (docs/multi-host.md, "Freezes and starvation").

`asyncio.timeout(2)` counts the loop's clock, which runs on while the loop itself does not: the
controller frozen (SIGSTOP, its VM paused) or starved of CPU. When the loop runs again, the
expired timer and the reply that arrived meanwhile are ready together, and the timer is served
first: a QEMU that answered at once "gave no reply within 2 s" and was killed as hung, and a
lease renewal that the database had accepted "failed" and the controller fenced itself.

`stall_tolerant_timeout(seconds)` gives up only when its deadline is served on time: a deadline
served STALL_SECONDS late or more proves the loop did not run meanwhile, so what it waits for
gets `seconds` more, at most MAX_EXTENSIONS times (a hung QEMU on a starved host is still given
up, after at most (MAX_EXTENSIONS + 1) x `seconds` plus the stalls).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

# How late a timer may be served on a busy but running loop (timers are served within
# milliseconds on a running loop; a loaded 2-core host was seen at 100-200 ms).
STALL_SECONDS = 0.25
# How many times one timeout is extended because the loop stalled.
MAX_EXTENSIONS = 3


@contextlib.asynccontextmanager
async def stall_tolerant_timeout(seconds: float) -> AsyncIterator[None]:
    """As `asyncio.timeout(seconds)`, but extended while the loop stalls (above).

    :raise TimeoutError: the block did not finish within `seconds` of a running loop.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as timeout:
        deadline = _Deadline(loop, timeout, seconds)
        try:
            yield
        finally:
            deadline.cancel()


class _Deadline:
    """The timer of one stall_tolerant_timeout: expires it when served on time, else moves on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: asyncio.Timeout, seconds: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._seconds = seconds
        self._extensions = 0
        self._handle = self._arm()

    def _arm(self) -> asyncio.TimerHandle:
        when = self._loop.time() + self._seconds
        return self._loop.call_at(when, self._check, when)

    def _check(self, when: float) -> None:
        late = self._loop.time() - when
        if late >= STALL_SECONDS and self._extensions < MAX_EXTENSIONS:
            self._extensions += 1
            self._handle = self._arm()
        else:
            self._timeout.reschedule(self._loop.time())

    def cancel(self) -> None:
        self._handle.cancel()
