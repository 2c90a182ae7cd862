"""HostQemus on real processes: which run (their launch records), SIGKILL, and the wait
(controller/self_fence.py). A `sleep` stands in for QEMU: only its launch record matters."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.layout import DataLayout
from controller.qemu import process
from controller.self_fence import KILL_POLL_SECONDS, KILL_WAIT_SECONDS, HostQemus


@pytest.fixture
def layout(tmp_path: Path) -> DataLayout:
    return DataLayout(tmp_path / "data", tmp_path / "images")


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        child.kill()
        child.wait()


def launch(layout: DataLayout, uid: str, children: list[subprocess.Popen[bytes]]) -> int:
    """A running process with the launch record the controller writes for a QEMU."""
    argv = ("sleep", "300")
    child = subprocess.Popen(argv)
    children.append(child)
    # Until the child has exec'd, /proc shows the test's own cmdline: a record written before
    # would name a process that is not (yet) the one it says (a race seen under load in CI).
    deadline = time.monotonic() + 5.0
    while process.read_cmdline(child.pid) != argv:
        assert time.monotonic() < deadline, "sleep did not start"
        time.sleep(0.005)
    identity = process.ProcessIdentity.of(child.pid)
    assert identity is not None
    paths = layout.runtime(uid)
    Path(paths.directory).mkdir(parents=True)
    record = process.LaunchRecord(argv, "d", child.pid, identity.start_ticks, datetime.now(UTC))
    Path(paths.record).write_text(record.encode())
    return child.pid


async def test_the_fence_kills_the_named_qemus_and_sees_them_gone(
    layout: DataLayout, children: list[subprocess.Popen[bytes]]
) -> None:
    launch(layout, "keep", children)
    launch(layout, "stray", children)
    Path(layout.runtime("stopped").directory).mkdir(parents=True)  # a runtime dir, no process
    qemus = HostQemus(layout)
    assert qemus.running() == ["keep", "stray"]
    assert qemus.kill(["stray", "stopped"]) == ["stray"]
    children[1].wait(timeout=KILL_WAIT_SECONDS)  # reaped here, as QEMU's supervisor does
    assert await qemus.wait_gone(["stray"]) == []
    assert qemus.running() == ["keep"]
    assert children[0].poll() is None


async def test_a_record_whose_pid_is_another_program_is_not_killed(
    layout: DataLayout, children: list[subprocess.Popen[bytes]]
) -> None:
    pid = launch(layout, "vm", children)
    paths = layout.runtime("vm")
    recorded = process.LaunchRecord.decode(Path(paths.record).read_text())
    # The pid now names a process with another command line: not ours (pid reuse).
    Path(paths.record).write_text(
        process.LaunchRecord(
            ("qemu-system-x86_64",), "d", pid, recorded.start_ticks, recorded.started_at
        ).encode()
    )
    qemus = HostQemus(layout)
    assert qemus.running() == []
    assert qemus.kill(["vm"]) == []
    assert children[0].poll() is None


def test_the_documented_kill_wait() -> None:
    """docs/multi-host.md: the fence waits at most 2 s to see its QEMUs gone."""
    assert KILL_WAIT_SECONDS == 2.0
    assert KILL_POLL_SECONDS < KILL_WAIT_SECONDS
