"""Throttling failed authentications: a leaky bucket of failures per key (a client address, a
user name). Pure: the clock is passed in.

Each failure adds one to the key's level; the level drains by one every `drain_seconds`. While a
new failure would take the level past `burst`, the key is throttled, and `retry_after` says for
how long. An attempt reserves its failure up front (`charge`) and gives it back when it
succeeds (`refund`), so a burst of concurrent attempts cannot overshoot the limit while they
are all still being checked.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limit:
    burst: int  # failures allowed at once
    drain_seconds: float  # then one more every this long

    @property
    def per_minute(self) -> float:
        return 60.0 / self.drain_seconds


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float
    announced: bool = False  # the throttling of this key has been logged


class FailureThrottle:
    """Buckets for at most `max_keys` keys; when full, the least recently charged is dropped."""

    def __init__(self, limit: Limit, *, max_keys: int, clock: Callable[[], float]) -> None:
        self.limit = limit
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def retry_after(self, key: str) -> int | None:
        """Whole seconds until `key` may try again, or None if it may try now."""
        bucket = self._drained(key)
        if bucket is None or bucket.level + 1 <= self.limit.burst:
            if bucket is not None:
                bucket.announced = False
            return None
        return max(1, math.ceil((bucket.level + 1 - self.limit.burst) * self.limit.drain_seconds))

    def newly_throttled(self, key: str) -> bool:
        """True once per throttling of `key`: when to log it, rather than at every refusal."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket.announced:
            return False
        bucket.announced = True
        return True

    def charge(self, key: str) -> None:
        bucket = self._drained(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(0.0, self._clock())
        bucket.level += 1
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)

    def refund(self, key: str) -> None:
        bucket = self._drained(key)
        if bucket is not None:
            bucket.level = max(0.0, bucket.level - 1)

    def __len__(self) -> int:
        return len(self._buckets)

    def _drained(self, key: str) -> _Bucket | None:
        bucket = self._buckets.get(key)
        if bucket is None:
            return None
        now = self._clock()
        bucket.level = max(0.0, bucket.level - (now - bucket.at) / self.limit.drain_seconds)
        bucket.at = now
        if bucket.level == 0:
            del self._buckets[key]
            return None
        return bucket
