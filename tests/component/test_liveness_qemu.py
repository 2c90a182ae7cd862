"""The liveness pass on real processes (controller/liveness_watch.py): a healthy idle QEMU costs
no QMP round trip, a SIGSTOPped one is asked and found unreachable within the QMP timeout, and
a process whose main thread is blocked off poll() (what a wedged QEMU main loop looks like in
/proc) is asked too. Real QEMU (`-machine none`, as the Hypervisor contract tests): e2e mark."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from api.testing.waiting import wait_until_async
from controller.liveness import RELOOK_SECONDS, RELOOKS, Target
from controller.liveness_watch import liveness_pass
from controller.model import QmpState
from controller.qemu import process
from controller.qemu.argv import RuntimePaths
from controller.qemu.monitor import COMMAND_TIMEOUT_SECONDS, Monitor
from controller.qemu.runtime import Runtime
from tests.component.test_hypervisor_contract import UID, Subject

# Passes a healthy QEMU goes through in the test; each would have cost a query-status before.
PASSES = 5


@pytest.fixture
def qmp_commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every QMP command any Monitor sends (the real one runs: this only counts)."""
    sent: list[str] = []
    execute = Monitor.execute

    async def counting(self: Monitor, command: str, *args: Any, **kwargs: Any) -> object:
        sent.append(command)
        return await execute(self, command, *args, **kwargs)

    monkeypatch.setattr(Monitor, "execute", counting)
    return sent


@pytest.fixture
async def qemu(tmp_path: Path) -> AsyncIterator[Subject]:
    subject = Subject("qemu", RuntimePaths(tmp_path / "run" / UID))
    await subject.start()
    try:
        yield subject
    finally:
        await subject.close()


def runtime_of(subject: Subject) -> Runtime:
    assert isinstance(subject.hv, Runtime)
    return subject.hv


@pytest.mark.e2e
async def test_a_healthy_idle_qemu_costs_no_qmp_round_trip(qemu: Subject, qmp_commands: list[str]) -> None:
    await qemu.spawn()
    runtime = runtime_of(qemu)
    await asyncio.sleep(0.2)  # QEMU settles into its main loop
    qmp_commands.clear()
    woken: list[str] = []
    for _ in range(PASSES):
        assert await liveness_pass(runtime, wake=woken.append) == []
        await asyncio.sleep(0.1)
    assert woken == []
    assert qmp_commands == []
    # The count is real: a forgotten state is asked for, once.
    runtime.distrust(UID)
    assert await runtime.qmp_state(UID) is QmpState.PRELAUNCH  # spawned with -S, never continued
    assert qmp_commands == ["query-status"]


@pytest.mark.e2e
async def test_a_sigstopped_qemu_is_asked_and_found_unreachable_within_the_qmp_timeout(
    qemu: Subject, qmp_commands: list[str]
) -> None:
    pid = await qemu.spawn()
    runtime = runtime_of(qemu)
    assert await runtime.qmp_state(UID) is QmpState.PRELAUNCH  # known: no ask without the pass
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    # The stop lands asynchronously; a real pass comes seconds later.
    await wait_until_async(lambda: (stat := process.read_stat(pid)) is not None and stat.state == "T")
    woken: list[str] = []
    assert await liveness_pass(runtime, wake=woken.append) == [UID]
    assert woken == [UID]
    # What the woken reconcile does first: ask, since the pass made it forget the known state.
    assert await runtime.qmp_state(UID) is QmpState.UNREACHABLE
    took = time.monotonic() - stopped
    # The re-looks, then the QMP timeout; the slack is for a loaded machine, not for a period.
    assert took < RELOOKS * RELOOK_SECONDS + COMMAND_TIMEOUT_SECONDS + 2.0
    assert qmp_commands[-1] == "query-status"
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def blocked_and_polling() -> Iterator[tuple[int, int]]:
    """Two real processes: one whose main thread waits on a lock nobody releases (a wedged main
    loop), one whose main thread waits in select() (an idle one)."""
    blocked = subprocess.Popen(
        [sys.executable, "-c", "import threading; lock = threading.Lock(); lock.acquire(); lock.acquire()"]
    )
    polling = subprocess.Popen([sys.executable, "-c", "import select; select.select([], [], [], 600)"])
    try:
        time.sleep(0.5)  # both reach their wait
        yield blocked.pid, polling.pid
    finally:
        for child in (blocked, polling):
            child.kill()
            child.wait()


class _Targets:
    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self.distrusted: list[str] = []

    def liveness_targets(self) -> list[Target]:
        return self.targets

    def distrust(self, uid: str) -> None:
        self.distrusted.append(uid)


async def test_a_main_thread_blocked_off_poll_is_asked_and_an_idle_one_is_not(
    blocked_and_polling: tuple[int, int], tmp_path: Path
) -> None:
    blocked, polling = blocked_and_polling
    socket = tmp_path / "qmp.sock"
    socket.touch()
    world = _Targets(
        [Target("wedged", blocked, True, str(socket)), Target("idle", polling, True, str(socket))]
    )
    woken: list[str] = []
    assert await liveness_pass(world, wake=woken.append) == ["wedged"]
    assert woken == world.distrusted == ["wedged"]
