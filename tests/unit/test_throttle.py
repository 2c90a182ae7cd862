"""The failure throttle (api/server/throttle.py) and the limits authentication uses."""

from __future__ import annotations

import pytest

from api.server.auth import ADDRESS_LIMIT, USER_LIMIT, client_key
from api.server.throttle import FailureThrottle, Limit


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def throttle(
    burst: int = 3, drain_seconds: float = 2.0, max_keys: int = 100
) -> tuple[FailureThrottle, Ticks]:
    ticks = Ticks()
    return FailureThrottle(Limit(burst, drain_seconds), max_keys=max_keys, clock=ticks), ticks


def test_the_documented_limits() -> None:
    """docs/security.md and api/server/auth.py state these numbers."""
    assert (ADDRESS_LIMIT.burst, ADDRESS_LIMIT.per_minute) == (30, 30.0)
    assert (USER_LIMIT.burst, USER_LIMIT.per_minute) == (10, 10.0)


def test_burst_then_one_per_drain_period() -> None:
    limiter, ticks = throttle(burst=3, drain_seconds=2.0)
    for _ in range(3):
        assert limiter.retry_after("k") is None
        limiter.charge("k")
    assert limiter.retry_after("k") == 2
    ticks.now += 1.0
    assert limiter.retry_after("k") == 1
    ticks.now += 1.0
    assert limiter.retry_after("k") is None
    limiter.charge("k")
    assert limiter.retry_after("k") == 2
    assert limiter.retry_after("other") is None


def test_a_refund_gives_the_reserved_failure_back() -> None:
    limiter, _ = throttle(burst=1)
    limiter.charge("k")
    assert limiter.retry_after("k") is not None
    limiter.refund("k")
    assert limiter.retry_after("k") is None
    limiter.refund("k")  # never below zero
    limiter.charge("k")
    assert limiter.retry_after("k") is not None


def test_a_throttling_is_announced_once() -> None:
    limiter, ticks = throttle(burst=1, drain_seconds=10.0)
    limiter.charge("k")
    assert limiter.retry_after("k") == 10
    assert limiter.newly_throttled("k")
    assert limiter.retry_after("k") == 10
    assert not limiter.newly_throttled("k")
    ticks.now += 10
    assert limiter.retry_after("k") is None  # allowed again ...
    limiter.charge("k")  # ... and over the limit again: a new throttling
    assert limiter.retry_after("k") == 10
    assert limiter.newly_throttled("k")


def test_keys_are_bounded_and_drained_ones_forgotten() -> None:
    limiter, ticks = throttle(burst=1, max_keys=2)
    for key in ("a", "b", "c"):
        limiter.charge(key)
    assert len(limiter) == 2
    assert limiter.retry_after("a") is None, "the least recently charged was dropped"
    ticks.now += 60
    assert limiter.retry_after("b") is None
    assert limiter.retry_after("c") is None
    assert len(limiter) == 0


@pytest.mark.parametrize(
    ("remote", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        (None, "unknown"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_client_keys(remote: str | None, key: str) -> None:
    """An IPv6 host usually has a whole /64: its failures count together."""
    assert client_key(remote) == key
