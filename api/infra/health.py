"""Readiness checks: what a process reports to /readyz, whichever process serves it.

A check returns None when fine, else a short reason. Probes need no auth, so a reason reveals
only what a check name already says: never a secret or a path. The API registers the store's
writability; the controller registers whether its sources run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

import structlog

log = structlog.get_logger(__name__)

ReadinessCheck = Callable[[], Awaitable[str | None]]
"""A readiness check: None when fine, else a short reason. It may be cancelled on timeout."""

CHECK_TIMEOUT_SECONDS = 2.0


async def run_checks(checks: Mapping[str, ReadinessCheck]) -> dict[str, str | None]:
    """Every check's reason (None: fine), run concurrently, each within CHECK_TIMEOUT_SECONDS,
    so one that hangs costs no more than that."""
    reasons = await asyncio.gather(*(_run_check(name, check) for name, check in checks.items()))
    return dict(zip(checks, reasons, strict=True))


async def _run_check(name: str, check: ReadinessCheck) -> str | None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            return await check()
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_SECONDS:g}s"
    except Exception as err:
        # A check is someone else's code: its bug makes the process not ready, not the probe fail.
        log.exception("readiness_check_crashed", check=name)
        return f"check failed: {type(err).__name__}"
