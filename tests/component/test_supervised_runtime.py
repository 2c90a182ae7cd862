"""The runtime's exit watch with supervisors, without one (a QEMU from before supervisors), and
after its supervisor was killed. A sleeper stands in for QEMU (it has no QMP socket, so each
attach waits out the 2 s QMP connect of an adopted process)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.clock import ManualClock
from controller.qemu import process
from controller.qemu.argv import RuntimePaths
from controller.qemu.runtime import Runtime
from tests.component.test_supervisor import SLEEPER

NOW = datetime(2026, 11, 22, tzinfo=UTC)
UID = "vm-1"
EXIT_SECONDS = 10.0


@pytest.fixture
async def runtime() -> AsyncIterator[tuple[Runtime, asyncio.Queue[str]]]:
    woken: asyncio.Queue[str] = asyncio.Queue()
    async with asyncio.TaskGroup() as tasks:
        watcher = Runtime(clock=ManualClock(NOW), wake=woken.put_nowait, tasks=tasks)
        yield watcher, woken
        await watcher.close()


async def _exit_record(paths: RuntimePaths, woken: asyncio.Queue[str]) -> tuple[int | None, int | None]:
    async with asyncio.timeout(EXIT_SECONDS):
        while (record := process.read_exit_record(paths)) is None:
            await woken.get()
    return record.exit_code, record.signal


async def test_an_adopted_supervised_qemu_killed_is_recorded_with_its_signal(
    runtime: tuple[Runtime, asyncio.Queue[str]], tmp_path: Path
) -> None:
    watcher, woken = runtime
    paths = RuntimePaths(tmp_path / UID)
    supervisor = process.spawn(SLEEPER, "d", paths, now=NOW)
    record = process.read_launch_record(paths)
    assert record is not None
    await watcher.attach(UID, paths, record.pid)  # as a restarted controller adopts it: no child

    os.kill(record.pid, signal.SIGKILL)

    assert await _exit_record(paths, woken) == (None, signal.SIGKILL)
    assert supervisor.wait(timeout=EXIT_SECONDS) == 0


@pytest.fixture
def unsupervised() -> Iterator[subprocess.Popen[bytes]]:
    """A QEMU stand-in started as before supervisors: directly, in its own session."""
    old = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        yield old
    finally:
        old.kill()
        old.wait()


async def test_a_qemu_from_before_supervisors_is_watched_itself(
    runtime: tuple[Runtime, asyncio.Queue[str]], unsupervised: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """Its launch record names no supervisor: the exit is seen, its status is unknown (vanished)."""
    watcher, woken = runtime
    paths = RuntimePaths(tmp_path / UID)
    Path(paths.directory).mkdir()
    old = unsupervised
    stat = process.read_stat(old.pid)
    assert stat is not None
    record = process.LaunchRecord(SLEEPER, "d", old.pid, stat.start_ticks, NOW)
    Path(paths.record).write_text(record.encode().replace(', "supervisor": null', ""))
    decoded = process.read_launch_record(paths)
    assert decoded == record
    await watcher.attach(UID, paths, record.pid)

    old.kill()

    assert await _exit_record(paths, woken) == (None, None)


async def test_a_killed_supervisor_hands_the_watch_to_qemu(
    runtime: tuple[Runtime, asyncio.Queue[str]], tmp_path: Path
) -> None:
    watcher, woken = runtime
    paths = RuntimePaths(tmp_path / UID)
    supervisor = process.spawn(SLEEPER, "d", paths, now=NOW)
    record = process.read_launch_record(paths)
    assert record is not None
    await watcher.attach(UID, paths, record.pid)  # the supervisor is the test's child here

    supervisor.kill()
    await asyncio.sleep(0.5)

    assert watcher.is_attached(UID, record.pid), "QEMU lives on: still watched"
    assert process.read_exit_record(paths) is None
    os.kill(record.pid, signal.SIGKILL)
    assert await _exit_record(paths, woken) == (None, None)
    assert not watcher.is_attached(UID, record.pid)
