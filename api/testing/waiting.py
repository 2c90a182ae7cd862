"""Waiting for a condition that something else makes true, for tests and the tools in hack/.

One synchronous and one asynchronous poller, with the same rule: `check()` is polled until it
returns something other than None or False (so 0 and an empty list count as found), and that
value is returned. Past the deadline they raise `WaitTimeout`, an AssertionError that names
what was awaited, so a test fails with a sentence instead of hanging.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 15.0


class WaitTimeout(AssertionError):
    """The awaited condition did not come true in time; the message says what and how long."""


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    describe: Callable[[], str] = lambda: "",
    interval: float = 0.1,
) -> T:
    """Poll `check` every `interval` seconds until it finds something; return that.

    :raise WaitTimeout: not within `timeout` seconds; the message holds `describe()`.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if _found(result):
            return result  # type: ignore[return-value]  # _found excluded None and False
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, describe())
        time.sleep(interval)


@overload
async def wait_until_async(
    check: Callable[[], Awaitable[T | None]],
    until: None = None,
    *,
    within: float = ...,
    what: str = ...,
    describe: Callable[[], str] = ...,
    interval: float = ...,
) -> T: ...
@overload
async def wait_until_async(
    check: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    *,
    within: float = ...,
    what: str = ...,
    describe: Callable[[], str] = ...,
    interval: float = ...,
) -> T: ...
@overload
async def wait_until_async(
    check: Callable[[], T | None],
    until: None = None,
    *,
    within: float = ...,
    what: str = ...,
    describe: Callable[[], str] = ...,
    interval: float = ...,
) -> T: ...
async def wait_until_async(
    check: Callable[[], object],
    until: Callable[[Any], bool] | None = None,
    *,
    within: float = DEFAULT_TIMEOUT_SECONDS,
    what: str = "the condition",
    describe: Callable[[], str] = lambda: "",
    interval: float = 0.05,
) -> Any:
    """Like `wait_until`, without blocking the event loop; `check` may be sync or async. With
    `until`, `check` reads a value and the wait ends once `until(value)` holds (the value may
    then be None or False too).

    :raise WaitTimeout: not within `within` seconds.
    """
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if until(result) if until is not None else _found(result):
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise _timed_out(what, within, describe())
        await asyncio.sleep(interval)


def _found(result: object) -> bool:
    return result is not None and result is not False


def _timed_out(what: str, timeout: float, detail: str) -> WaitTimeout:
    return WaitTimeout(f"{what}: not within {timeout:g} s" + (f"\n{detail}" if detail else ""))
