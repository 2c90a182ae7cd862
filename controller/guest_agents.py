"""The guest agents of the running VMs (docs/guest-agent.md).

Every liveness period one pass asks each running VM that has an agent channel what its guest
reports (os info, host name, interfaces) and wakes the VMs whose answer changed, so their
reconcile writes `status.guest` only then. Observing reads the last answer (no I/O); the
executor asks an agent for `guest-shutdown`; snapshots freeze and thaw through it.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from api.guest_types import GuestStatus
from controller.liveness import next_delay
from controller.liveness_watch import Watched
from controller.qemu.agent_channel import AGENT_SOCKET_NAME
from controller.qemu.guest_agent import AgentRefused, AgentUnavailable, GuestAgent

log = structlog.get_logger(__name__)

# Agents asked at once in one pass: each ask is a connect and four short round trips.
POLL_CONCURRENCY = 8
NOT_CONNECTED = GuestStatus(agent_connected=False)


class GuestAgents:
    """`targets()` lists (uid, pid, runtime dir) of every watched QEMU; those whose runtime dir
    has the agent socket are asked. `wake(uid)` queues a reconcile."""

    def __init__(
        self,
        *,
        targets: Callable[[], list[tuple[str, int, Path]]],
        wake: Callable[[str], None],
        connect: Callable[[Path], Awaitable[GuestAgent]] = GuestAgent.in_runtime_dir,
    ) -> None:
        self._targets = targets
        self._wake = wake
        self._connect = connect
        self._last: dict[str, tuple[int, GuestStatus]] = {}

    def observed(self, uid: str, pid: int) -> GuestStatus | None:
        """What the agent in QEMU `pid` of `uid` said last (NOT_CONNECTED when it did not
        answer), None when it was never asked (a QEMU started since the last pass)."""
        pid_and_status = self._last.get(uid)
        return pid_and_status[1] if pid_and_status is not None and pid_and_status[0] == pid else None

    async def poll(self) -> list[str]:
        """Ask every agent once; wake and return the uids whose answer changed."""
        targets = [(uid, pid, d) for uid, pid, d in self._targets() if (d / AGENT_SOCKET_NAME).exists()]
        for gone in self._last.keys() - {uid for uid, _, _ in targets}:
            del self._last[gone]
        limit = asyncio.Semaphore(POLL_CONCURRENCY)

        async def ask(directory: Path) -> GuestStatus:
            async with limit:
                return await self.ask(directory)

        async with asyncio.TaskGroup() as tasks:
            asked = {(uid, pid): tasks.create_task(ask(directory)) for uid, pid, directory in targets}
        changed = [
            (uid, pid) for (uid, pid), task in asked.items() if self._last.get(uid) != (pid, task.result())
        ]
        for uid, pid in changed:
            self._last[uid] = (pid, asked[uid, pid].result())
            self._wake(uid)
        return [uid for uid, _ in changed]

    async def ask(self, directory: Path) -> GuestStatus:
        """The guest's report, or NOT_CONNECTED when its agent does not answer."""
        try:
            async with await self._connect(directory) as agent:
                return await agent.status()
        except (AgentUnavailable, AgentRefused) as err:
            log.debug("guest_agent_unavailable", directory=str(directory), error=str(err))
            return NOT_CONNECTED

    async def shutdown(self, directory: Path) -> None:
        """guest-shutdown through the VM's agent.

        :raise AgentUnavailable: no agent answered.
        """
        async with await self._connect(directory) as agent:
            await agent.shutdown()


def of_runtime(runtime: Watched, wake: Callable[[str], None]) -> GuestAgents:
    """The agents of the QEMUs `runtime` watches (their runtime dir holds the agent socket)."""

    # uid -> (pid, its agent socket's directory or None). QEMU makes its sockets before QMP
    # answers, so whether a QEMU has one is known from its first pass on: a fleet without agents
    # costs one stat per VM when its QEMU starts, not one per VM every pass.
    known: dict[str, tuple[int, Path | None]] = {}

    def with_agents() -> list[tuple[str, int, Path]]:
        targets = runtime.liveness_targets()
        for gone in known.keys() - {target.uid for target in targets}:
            del known[gone]
        found = []
        for target in targets:
            seen = known.get(target.uid)
            if seen is None or seen[0] != target.pid:
                directory = os.path.dirname(target.qmp_socket)
                has_agent = os.path.exists(f"{directory}/{AGENT_SOCKET_NAME}")
                seen = known[target.uid] = (target.pid, Path(directory) if has_agent else None)
            if seen[1] is not None:
                found.append((target.uid, target.pid, seen[1]))
        return found

    return GuestAgents(targets=with_agents, wake=wake)


async def freeze(directory: Path, seconds: float) -> int:
    """Freeze the guest's filesystems (guest-fsfreeze-freeze) through the agent of the VM whose
    runtime dir is `directory`, within `seconds`; the number frozen. Thaw with `thaw` soon after.

    :raise AgentUnavailable: no agent answered in time. :raise AgentRefused: it refused."""
    async with await GuestAgent.in_runtime_dir(directory) as agent:
        return await agent.freeze(seconds)


async def thaw(directory: Path, seconds: float) -> int:
    """Thaw the guest's filesystems (guest-fsfreeze-thaw); the number thawed."""
    async with await GuestAgent.in_runtime_dir(directory) as agent:
        return await agent.thaw(seconds)


async def watch_guest_agents(
    agents: GuestAgents,
    *,
    period: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    draw: Callable[[], float] = random.random,
) -> None:
    """One pass every `period` seconds (jittered early, as the liveness pass), until cancelled."""
    while True:
        await sleep(next_delay(period, draw()))
        await agents.poll()
