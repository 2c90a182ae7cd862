"""A work queue with client-go semantics, for asyncio.

Semantics (client-go `util/workqueue`):
- `add(key)` is idempotent while the key waits: repeated adds collapse into one item.
- A key is handed to at most one worker at a time. Adding a key that is being processed marks it
  dirty; `done(key)` then queues it again, so no change is lost and no key runs twice at once.
- `add_after(key, delay)` queues the key later; the earliest pending time wins.
- `add_rate_limited(key)` queues it after a per-key exponential backoff
  (`base * 2**failures`, capped at `cap`); `forget(key)` resets that key's failures.
- `shut_down()` makes `get()` raise `QueueShutDown` once the queue is empty, so workers drain.

Fair across projects: each key belongs to a group (its project, from the injected `group_of`),
and `get()` takes round-robin across the groups that have keys waiting, FIFO within a group.
So one project's 10,000 queued keys delay another project's key by at most one key per other
waiting group, instead of by all 10,000 (client-go's queue is one FIFO). A group that empties
leaves the rotation; when it has a key again it joins at the end.

Time comes from an injected `Clock`, so backoff is tested without sleeping.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from controller.clock import Clock, TimerHandle

KeyT = TypeVar("KeyT", bound=Hashable)

DEFAULT_BACKOFF_BASE_SECONDS = 0.5
DEFAULT_BACKOFF_CAP_SECONDS = 300.0


class QueueObserver(Protocol):
    """What client-go's workqueue reports to its metrics provider."""

    def added(self, depth: int) -> None: ...
    def retried(self) -> None: ...
    def started(self, waited_seconds: float, depth: int) -> None: ...
    def finished(self, worked_seconds: float) -> None: ...


class _NoObserver:
    def added(self, depth: int) -> None:
        pass

    def retried(self) -> None:
        pass

    def started(self, waited_seconds: float, depth: int) -> None:
        pass

    def finished(self, worked_seconds: float) -> None:
        pass


class QueueShutDown(Exception):
    """The queue was shut down and holds no more work."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Per-key exponential backoff: base * 2**failures, at most cap."""

    base: float = DEFAULT_BACKOFF_BASE_SECONDS
    cap: float = DEFAULT_BACKOFF_CAP_SECONDS

    def delay(self, failures: int) -> float:
        return float(min(self.cap, self.base * 2.0 ** min(failures, 62)))


@dataclass
class _Pending:
    due: float
    timer: TimerHandle


def _one_group(_key: object) -> Hashable:
    return None


class WorkQueue(Generic[KeyT]):
    def __init__(
        self,
        *,
        clock: Clock,
        backoff: Backoff | None = None,
        observer: QueueObserver | None = None,
        group_of: Callable[[KeyT], Hashable] = _one_group,
    ) -> None:
        """`group_of(key)`: the fairness group of a key (its project); asked when it is queued."""
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._observer: QueueObserver = observer or _NoObserver()
        self._group_of = group_of
        # When each waiting key was queued, and when each processing key was handed out.
        self._queued_at: dict[KeyT, float] = {}
        self._started_at: dict[KeyT, float] = {}
        # The waiting keys of each group, and the groups that have some, in turn order.
        self._groups: dict[Hashable, deque[KeyT]] = {}
        self._turns: deque[Hashable] = deque()
        self._depth = 0
        self._dirty: set[KeyT] = set()
        self._processing: set[KeyT] = set()
        self._pending: dict[KeyT, _Pending] = {}
        self._failures: dict[KeyT, int] = {}
        # Set whenever a key is queued or the queue shuts down; workers re-check and clear it.
        self._wakeup = asyncio.Event()
        # Set whenever a key is done; wait_done() re-checks and clears it.
        self._finished = asyncio.Event()
        self._shutting_down = False

    def __len__(self) -> int:
        """The number of keys waiting for a worker (workqueue_depth)."""
        return self._depth

    def add(self, key: KeyT) -> None:
        """Queue `key` now, unless it already waits."""
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        self._cancel_pending(key)
        if key in self._processing:
            return
        self._enqueue(key)

    def add_after(self, key: KeyT, delay: float) -> None:
        """Queue `key` after `delay` seconds; an earlier pending time is kept."""
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        due = self._clock.monotonic() + delay
        existing = self._pending.get(key)
        if existing is not None:
            if existing.due <= due:
                return
            existing.timer.cancel()
        timer = self._clock.call_later(delay, lambda: self._fire(key))
        self._pending[key] = _Pending(due, timer)

    def add_rate_limited(self, key: KeyT) -> float:
        """Queue `key` after its backoff delay, and count one more failure. Returns the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        self._observer.retried()
        delay = self._backoff.delay(failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: KeyT) -> None:
        """Reset `key`'s backoff after a success."""
        self._failures.pop(key, None)

    async def get(self) -> KeyT:
        """Wait for a key and mark it processing. :raise QueueShutDown: shut down and empty."""
        while not self._depth:
            if self._shutting_down:
                raise QueueShutDown
            # No await between the emptiness check and clear(), so no add can slip between.
            self._wakeup.clear()
            await self._wakeup.wait()
        key = self._take_next()
        self._processing.add(key)
        self._dirty.discard(key)
        now = self._clock.monotonic()
        self._started_at[key] = now
        self._observer.started(now - self._queued_at.pop(key, now), self._depth)
        return key

    def done(self, key: KeyT) -> None:
        """Mark `key` finished; if it was added meanwhile, queue it again."""
        self._processing.discard(key)
        self._finished.set()
        started = self._started_at.pop(key, None)
        if started is not None:
            self._observer.finished(self._clock.monotonic() - started)
        if key in self._dirty:
            self._enqueue(key)

    def is_busy(self, key: KeyT) -> bool:
        """`key` waits for a worker or is being worked on (a timed wake-up is not busy)."""
        return key in self._dirty or key in self._processing

    async def wait_done(self, keys: Collection[KeyT]) -> None:
        """Return once none of `keys` waits or is being worked on."""
        while any(self.is_busy(key) for key in keys):
            # No await between the check and clear(), so no done() can slip between.
            self._finished.clear()
            await self._finished.wait()

    def shut_down(self) -> None:
        """Stop accepting keys; workers drain what is queued, then `get()` raises."""
        self._shutting_down = True
        for pending in self._pending.values():
            pending.timer.cancel()
        self._pending.clear()
        self._notify()

    def _enqueue(self, key: KeyT) -> None:
        group = self._group_of(key)
        waiting = self._groups.get(group)
        if waiting is None:
            waiting = self._groups[group] = deque()
            self._turns.append(group)
        waiting.append(key)
        self._depth += 1
        self._queued_at[key] = self._clock.monotonic()
        self._observer.added(self._depth)
        self._notify()

    def _take_next(self) -> KeyT:
        """The oldest key of the group whose turn it is; the group goes to the back of the line."""
        group = self._turns.popleft()
        waiting = self._groups[group]
        key = waiting.popleft()
        if waiting:
            self._turns.append(group)
        else:
            del self._groups[group]
        self._depth -= 1
        return key

    def _fire(self, key: KeyT) -> None:
        self._pending.pop(key, None)
        self.add(key)

    def _cancel_pending(self, key: KeyT) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending.timer.cancel()

    def _notify(self) -> None:
        self._wakeup.set()
