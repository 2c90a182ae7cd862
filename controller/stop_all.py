"""The end of a stop-everything shutdown (`stop_vms_on_exit`): wait for the VMs the reconcile
loop is stopping, and kill what is left at the deadline."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

import structlog

from controller.qemu import process
from controller.qemu.runtime import Runtime

log = structlog.get_logger(__name__)
SHUTDOWN_KILL_WAIT_SECONDS = 2.0


async def wait_then_kill_the_rest(runtime: Runtime, seconds: float) -> None:
    """Wait up to `seconds` for no VM to be attached; then SIGKILL the rest and wait
    SHUTDOWN_KILL_WAIT_SECONDS for their exits to be seen."""
    if not await _within(seconds, runtime.wait_none_attached()):
        # Killed here, they count as the controller's stop; killed with the container by the
        # runtime later, they would count as failures on the next start.
        running = runtime.attached_uids()
        log.warning("vms_killed_at_shutdown_timeout", count=len(running), uids=running[:20])
        for uid in running:
            record = runtime.attached_record(uid)
            if record is not None:
                process.send_signal(record, signal.SIGKILL)
        await _within(SHUTDOWN_KILL_WAIT_SECONDS, runtime.wait_none_attached())
    log.info("vms_stopped", still_running=len(runtime.attached_uids()))


async def _within(seconds: float, waiting: Coroutine[Any, Any, None]) -> bool:
    """Whether `waiting` finished within `seconds` (it is cancelled if not)."""
    try:
        async with asyncio.timeout(seconds):
            await waiting
    except TimeoutError:
        return False
    return True
