"""The QEMUs of this host, as a fence sees them: which run, and killing them at once.

Used by `HostAgent` (controller/host_agent.py) when it fences: every QEMU when it cannot renew
its lease, or those of VMs moved away when it finds its epoch stale. It reads the launch
records of the data dir rather than the runtime's watch list: a QEMU not attached yet (being
adopted, or spawned just before a freeze) is killed all the same. The kill is synchronous and
SIGKILL: no other task of the controller runs between the decision and the signal, and a guest
that would take seconds to shut down has no seconds left.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable

import structlog

from controller.layout import DataLayout
from controller.qemu import process

log = structlog.get_logger(__name__)
# How long the fence waits to see its SIGKILLed QEMUs gone (the kernel takes milliseconds).
KILL_WAIT_SECONDS = 2.0
KILL_POLL_SECONDS = 0.02


class HostQemus:
    def __init__(self, layout: DataLayout) -> None:
        self._layout = layout

    def running(self) -> list[str]:
        """The uids whose QEMU (the one their launch record names) runs here."""
        return sorted(uid for uid in self._layout.runtime_uids() if self._live_record(uid) is not None)

    def kill(self, uids: Iterable[str]) -> list[str]:
        """SIGKILL the QEMU of each of `uids` that runs; returns those signalled."""
        killed = []
        for uid in uids:
            record = self._live_record(uid)
            if record is not None:
                process.send_signal(record, signal.SIGKILL)
                log.warning("vm_fenced", uid=uid, pid=record.pid)
                killed.append(uid)
        return killed

    async def wait_gone(self, uids: Iterable[str]) -> list[str]:
        """Wait until none of `uids` runs, at most KILL_WAIT_SECONDS; returns those still running."""
        left = list(uids)
        for _ in range(round(KILL_WAIT_SECONDS / KILL_POLL_SECONDS)):
            left = [uid for uid in left if self._live_record(uid) is not None]
            if not left:
                break
            await asyncio.sleep(KILL_POLL_SECONDS)
        return left

    def _live_record(self, uid: str) -> process.LaunchRecord | None:
        record = process.read_launch_record(self._layout.runtime(uid))
        return record if record is not None and process.is_alive_and_ours(record) else None
