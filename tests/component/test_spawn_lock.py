"""No duplicate QEMU per VM: the runtime lock is held by the process and its supervisor from spawn
onward, until the supervisor has recorded the exit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.qemu import process
from controller.qemu.argv import RuntimePaths

NOW = datetime(2026, 11, 22, tzinfo=UTC)
# Stands in for QEMU: it only has to live, holding the lock descriptor spawn hands it.
SLEEPER = (sys.executable, "-c", "import time; time.sleep(60)")


@pytest.fixture
def first(tmp_path: Path) -> Iterator[tuple[RuntimePaths, subprocess.Popen[bytes]]]:
    paths = RuntimePaths(tmp_path / "run" / "vm-1")
    child = process.spawn(SLEEPER, "digest-1", paths, now=NOW)
    try:
        yield paths, child
    finally:
        _kill_vm(paths, child)


def _kill_vm(paths: RuntimePaths, supervisor: subprocess.Popen[bytes]) -> None:
    """SIGKILL the QEMU stand-in; its supervisor records that and exits."""
    record = process.read_launch_record(paths)
    assert record is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signal.SIGKILL)
    supervisor.wait(timeout=10)


def test_a_second_spawn_for_the_same_vm_fails_and_changes_nothing(
    first: tuple[RuntimePaths, subprocess.Popen[bytes]],
) -> None:
    paths, child = first
    with pytest.raises(process.DuplicateProcess):
        process.spawn(SLEEPER, "digest-2", paths, now=NOW)
    record = process.read_launch_record(paths)
    assert record is not None
    assert record.supervisor is not None
    assert (record.supervisor[0], record.digest) == (child.pid, "digest-1")
    assert process.is_alive_and_ours(record)
    assert child.poll() is None


def test_another_controller_process_cannot_spawn_it_either(
    first: tuple[RuntimePaths, subprocess.Popen[bytes]],
) -> None:
    paths, _ = first
    attempt = (
        "import sys; from datetime import datetime, UTC; from pathlib import Path;"
        "from controller.qemu import process; from controller.qemu.argv import RuntimePaths\n"
        "try:\n"
        f"    runtime = RuntimePaths(Path({str(paths.directory)!r}))\n"
        "    process.spawn(('true',), 'd', runtime, now=datetime.now(UTC))\n"
        "except process.DuplicateProcess:\n"
        "    sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", attempt], check=False, timeout=30)
    assert done.returncode == 3


def test_the_lock_goes_with_the_process(first: tuple[RuntimePaths, subprocess.Popen[bytes]]) -> None:
    paths, child = first
    _kill_vm(paths, child)
    again = process.spawn(SLEEPER, "digest-2", paths, now=NOW)
    try:
        assert again.pid != child.pid
    finally:
        _kill_vm(paths, again)


def test_the_lock_stays_with_a_qemu_whose_supervisor_was_killed(
    first: tuple[RuntimePaths, subprocess.Popen[bytes]],
) -> None:
    paths, child = first
    child.kill()
    child.wait()
    with pytest.raises(process.DuplicateProcess):
        process.spawn(SLEEPER, "digest-2", paths, now=NOW)
