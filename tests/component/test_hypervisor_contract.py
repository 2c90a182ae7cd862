"""The Hypervisor contract (controller/hypervisor.py): the same tests against real QEMU and the fake.

The real side is controller/qemu/runtime.py with QEMU itself (`-machine none`: no guest, so a
process starts in milliseconds and answers QMP), hence the e2e mark; the fake side is
controller/hypervisor_fake.py, which the reconciler table tests stand on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.clock import LoopClock
from controller.hypervisor import AlreadyRunning, CommandUnanswered, Hypervisor
from controller.hypervisor_fake import FakeHypervisor
from controller.model import QmpState
from controller.qemu.argv import QEMU_BINARY, QMP_SOCKET_NAME, RuntimePaths
from controller.qemu.runtime import Runtime

UID = "vm-1"
WAIT_SECONDS = 10.0


def argv(paths: RuntimePaths) -> tuple[str, ...]:
    return (
        QEMU_BINARY, "-machine", "none", "-S", "-nodefaults", "-display", "none",
        "-pidfile", str(paths.pidfile),
        "-chardev", f"socket,id=qmp,path={QMP_SOCKET_NAME},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    )  # fmt: skip


class Subject:
    """One implementation, and the world's side of it: a controller restart, an outside kill."""

    def __init__(self, kind: str, paths: RuntimePaths) -> None:
        self.kind = kind
        self.paths = paths
        self.woken: list[str] = []
        self._woken = asyncio.Event()
        self.clock = LoopClock()
        self._tasks = asyncio.TaskGroup()
        self.hv: Hypervisor = FakeHypervisor(clock=self.clock, wake=self._wake)
        self._pids: set[int] = set()

    async def start(self) -> None:
        if self.kind == "qemu":
            await self._tasks.__aenter__()
            self.hv = Runtime(clock=self.clock, wake=self._wake, tasks=self._tasks)

    async def spawn(self, digest: str = "d1") -> int:
        spawned = await self.hv.spawn(UID, self.paths, argv(self.paths), digest)
        assert spawned is not None
        assert spawned.monitor_ready
        self._pids.add(spawned.pid)
        return spawned.pid

    async def restart_controller(self) -> None:
        """A new controller: it watches nothing and is no process's parent."""
        if isinstance(self.hv, FakeHypervisor):
            self.hv.restart_controller()
            return
        assert isinstance(self.hv, Runtime)
        await self.hv.close()
        self.hv = Runtime(clock=self.clock, wake=self._wake, tasks=self._tasks)

    def kill_from_outside(self, pid: int) -> None:
        if isinstance(self.hv, FakeHypervisor):
            self.hv.exit(UID, signal=signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)

    def _wake(self, uid: str) -> None:
        self.woken.append(uid)
        self._woken.set()

    async def wait_woken(self) -> None:
        async with asyncio.timeout(WAIT_SECONDS):
            await self._woken.wait()

    async def wait_gone(self, *, recorded: bool = False) -> None:
        """Until the process is gone from /proc (and, when `recorded`, its exit is recorded).
        Nothing tells of a process that is not watched, so this looks every 10 ms."""
        for _ in range(int(WAIT_SECONDS / 0.01)):
            view = await self.hv.inspect(UID, self.paths, expect_process=False)
            if view.process is None and not view.exiting and (view.exit is not None or not recorded):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{UID}'s process did not go within {WAIT_SECONDS} s")

    async def close(self) -> None:
        for pid in self._pids:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
        if isinstance(self.hv, Runtime):
            await self.hv.close()
            await self._tasks.__aexit__(None, None, None)


@pytest.fixture(params=[pytest.param("qemu", marks=pytest.mark.e2e), "fake"])
async def subject(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Subject]:
    subject = Subject(request.param, RuntimePaths(tmp_path / "run" / UID))
    await subject.start()
    try:
        yield subject
    finally:
        await subject.close()


async def test_a_spawned_process_is_watched_paused_and_answers_commands(subject: Subject) -> None:
    pid = await subject.spawn()
    view = await subject.hv.inspect(UID, subject.paths, expect_process=False)
    assert view.process is not None
    assert (view.process.pid, view.process.argv_digest, view.process.watched) == (pid, "d1", True)
    assert (view.process.qmp, view.exit, view.has_runtime_dir, view.has_stale_runtime) == (
        QmpState.PRELAUNCH, None, True, False,
    )  # fmt: skip
    await subject.hv.command(UID, "cont")
    view = await subject.hv.inspect(UID, subject.paths, expect_process=False)
    assert view.process is not None
    assert view.process.qmp is QmpState.RUNNING


async def test_a_stopped_guest_is_paused_not_prelaunch_also_after_a_controller_restart(
    subject: Subject,
) -> None:
    """`tofu-qemu pause` (QMP stop) is told apart from the -S of a spawn: only the latter is
    the controller's own to `cont` (controller/pausing.py)."""
    pid = await subject.spawn()
    await subject.hv.command(UID, "cont")
    await subject.hv.command(UID, "stop")
    view = await subject.hv.inspect(UID, subject.paths, expect_process=False)
    assert view.process is not None
    assert view.process.qmp is QmpState.PAUSED
    await subject.restart_controller()
    await subject.hv.attach(UID, subject.paths, pid)
    view = await subject.hv.inspect(UID, subject.paths, expect_process=True)
    assert view.process is not None
    assert view.process.qmp is QmpState.PAUSED


async def test_a_second_spawn_is_refused(subject: Subject) -> None:
    pid = await subject.spawn()
    with pytest.raises(AlreadyRunning):
        await subject.hv.spawn(UID, subject.paths, argv(subject.paths), "d2")
    view = await subject.hv.inspect(UID, subject.paths, expect_process=False)
    assert view.process is not None
    assert (view.process.pid, view.process.argv_digest) == (pid, "d1")


async def test_a_watched_exit_is_recorded_at_once_and_wakes_the_vm(subject: Subject) -> None:
    pid = await subject.spawn()
    await subject.hv.signal(UID, subject.paths, pid, signal.SIGKILL)
    await subject.wait_woken()
    view = await subject.hv.inspect(UID, subject.paths, expect_process=False)
    assert view.process is None
    assert view.exit is not None
    assert (view.exit.signal, view.has_stale_runtime, view.unrecorded_exit_pid) == (
        signal.SIGKILL,
        True,
        None,
    )


async def test_quit_ends_the_process_cleanly(subject: Subject) -> None:
    await subject.spawn()
    await subject.hv.command(UID, "quit")
    await subject.wait_gone(recorded=True)
    view = await subject.hv.inspect(UID, subject.paths, expect_process=False)
    assert view.exit is not None
    assert (view.exit.exit_code, view.exit.signal) == (0, None)


async def test_after_a_controller_restart_a_live_process_is_found_unwatched_then_attached(
    subject: Subject,
) -> None:
    pid = await subject.spawn()
    await subject.restart_controller()
    view = await subject.hv.inspect(UID, subject.paths, expect_process=True)
    assert view.process is not None
    assert (view.process.pid, view.process.watched) == (pid, False)
    assert view.process.qmp is QmpState.UNREACHABLE, "looking does not connect"
    with pytest.raises(CommandUnanswered):
        await subject.hv.command(UID, "cont")
    await subject.hv.attach(UID, subject.paths, pid)
    view = await subject.hv.inspect(UID, subject.paths, expect_process=True)
    assert view.process is not None
    assert view.process.watched
    assert view.process.qmp is QmpState.PRELAUNCH


async def test_an_exit_nobody_watched_is_found_and_recorded_once(subject: Subject) -> None:
    pid = await subject.spawn()
    await subject.restart_controller()
    subject.kill_from_outside(pid)
    await subject.wait_gone()
    view = await subject.hv.inspect(UID, subject.paths, expect_process=True)
    assert (view.unrecorded_exit_pid, view.exit) == (pid, None), "looking records nothing"
    await subject.hv.record_exit(UID, subject.paths, pid)
    first = (await subject.hv.inspect(UID, subject.paths, expect_process=True)).exit
    await subject.hv.record_exit(UID, subject.paths, pid)
    view = await subject.hv.inspect(UID, subject.paths, expect_process=True)
    assert first is not None
    assert view.exit == first
    assert view.unrecorded_exit_pid is None
    assert (first.exit_code, first.signal) == (None, signal.SIGKILL), "its supervisor saw the kill"


async def test_clean_then_remove_leave_nothing(subject: Subject) -> None:
    pid = await subject.spawn()
    await subject.hv.signal(UID, subject.paths, pid, signal.SIGKILL)
    await subject.wait_woken()
    await subject.hv.clean(UID, subject.paths)
    view = await subject.hv.inspect(UID, subject.paths, expect_process=False)
    assert (view.exit, view.has_stale_runtime, view.has_runtime_dir) == (None, False, True)
    await subject.hv.remove(UID, subject.paths)
    view = await subject.hv.inspect(UID, subject.paths, expect_process=False)
    assert (view.has_runtime_dir, view.process) == (False, None)


async def test_signalling_a_pid_that_is_not_ours_does_nothing(subject: Subject) -> None:
    pid = await subject.spawn()
    await subject.hv.signal(UID, subject.paths, pid + 100_000, signal.SIGKILL)
    view = await subject.hv.inspect(UID, subject.paths, expect_process=False)
    assert view.process is not None
    assert view.process.pid == pid
