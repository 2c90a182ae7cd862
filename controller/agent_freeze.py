"""Snapshots' GuestFreezer (controller/snapshots.py) through the guest agents: a running VM whose
agent answered at the last poll has its filesystems frozen (guest-fsfreeze-freeze) around the
snapshot's QMP transaction, and thawed right after (docs/snapshots.md, docs/guest-agent.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import structlog

from controller import guest_agents
from controller.guest_agents import GuestAgents
from controller.layout import DataLayout
from controller.qemu.guest_agent import AgentRefused, AgentUnavailable
from controller.qemu.runtime import Runtime

log = structlog.get_logger(__name__)
# guest-fsfreeze-freeze syncs every filesystem first: on a busy guest that takes a while.
FREEZE_SECONDS = 10.0
THAW_SECONDS = 5.0


class ThawFailed(OSError):
    """The agent did not confirm the thaw: the guest may still be frozen. The snapshot step
    fails and is tried again, and its freeze-then-thaw thaws the guest."""


class AgentFreezer:
    """`pid_of(uid)`: the pid of the QEMU watched for `uid`; `run_dir(uid)`: its runtime dir."""

    def __init__(
        self, agents: GuestAgents, *, pid_of: Callable[[str], int | None], run_dir: Callable[[str], Path]
    ) -> None:
        self._agents = agents
        self._pid_of = pid_of
        self._run_dir = run_dir

    def connected(self, uid: str) -> bool:
        pid = self._pid_of(uid)
        seen = self._agents.observed(uid, pid) if pid is not None else None
        return seen is not None and seen.agent_connected

    async def freeze(self, uid: str) -> bool:
        """False (the snapshot goes on crash-consistent) when the agent does not freeze."""
        try:
            frozen = await guest_agents.freeze(self._run_dir(uid), FREEZE_SECONDS)
        except (AgentUnavailable, AgentRefused) as err:
            log.warning("guest_freeze_failed", uid=uid, error=str(err))
            # A freeze that timed out may still complete in the guest: thaw to be sure.
            with contextlib.suppress(ThawFailed):
                await self.thaw(uid)
            return False
        log.info("guest_frozen", uid=uid, filesystems=frozen)
        return True

    async def thaw(self, uid: str) -> None:
        try:
            thawed = await guest_agents.thaw(self._run_dir(uid), THAW_SECONDS)
        except (AgentUnavailable, AgentRefused) as err:
            raise ThawFailed(f"the guest agent did not thaw the filesystems: {err}") from err
        log.info("guest_thawed", uid=uid, filesystems=thawed)


def freezer_of(agents: GuestAgents, runtime: Runtime, layout: DataLayout) -> AgentFreezer:
    """The freezer of the VMs `runtime` watches, whose agents `agents` polls."""

    def pid_of(uid: str) -> int | None:
        record = runtime.attached_record(uid)
        return record.pid if record is not None else None

    return AgentFreezer(agents, pid_of=pid_of, run_dir=lambda uid: Path(layout.runtime(uid).directory))
