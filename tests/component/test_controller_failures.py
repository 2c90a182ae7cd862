"""The controller's failure paths, in-process against a real store, with a stand-in QEMU.

The stand-in (a script named qemu-system-x86_64 first on PATH) fails the way QEMU fails; the
happy paths run real QEMU in tests/e2e.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from api.infra.metrics import Metrics
from api.store import Database, StateStore, open_database
from api.store.allocations import Allocations
from api.store.status_writer import VMStatusWriter
from api.testing.tfstate import encode, vm_state
from api.testing.waiting import wait_until_async
from api.tfstate import extract_vms, parse_state
from api.types import Phase, QemuVMStatus
from controller.manager import Controller
from controller.settings import ControllerSettings

DEADLINE_SECONDS = 15.0
T = TypeVar("T")
FAKE_QEMU = """#!/bin/sh
echo "qemu-system-x86_64: -kernel tiny-guest/vmlinuz: could not load kernel" >&2
exit 1
"""


@dataclass
class Harness:
    db: Database
    states: StateStore
    objects: VMStatusWriter
    allocations: Allocations
    settings: ControllerSettings
    controller: Controller
    serial: int = 0

    async def declare(self, vms: dict[str, dict[str, Any]]) -> None:
        self.serial += 1
        body = encode(vm_state(self.serial, vms))
        summary = parse_state(body)
        await self.states.write("lab", body, summary, extract_vms(summary.document), lock_id=None)

    async def status_of(self, name: str) -> tuple[str, QemuVMStatus]:
        for uid in await self.objects.versions():
            record = await self.objects.get(uid)
            if record is not None and record.name == name and record.deleted_at is None:
                return uid, QemuVMStatus.model_validate(record.status or {})
        raise AssertionError(f"no VM named {name}")

    async def wait_for(self, name: str, check: Callable[[QemuVMStatus], bool]) -> QemuVMStatus:
        async def matching() -> QemuVMStatus | None:
            _, status = await self.status_of(name)
            return status if check(status) else None

        return await wait_until_async(matching, what=f"VM {name}'s status")


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "qemu-system-x86_64"
    script.write_text(FAKE_QEMU)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


@contextlib.asynccontextmanager
async def controller_on(
    tmp_path: Path,
    *,
    metrics: Metrics | None = None,
    before_start: Callable[[Controller], Awaitable[None]] | None = None,
) -> AsyncIterator[Harness]:
    """A store and a running controller in `tmp_path`, with a (bogus) kernel in its images dir.

    `before_start(controller)` runs after the controller is built and before it runs.
    """
    data_dir = tmp_path / "data"
    images = data_dir / "images" / "tiny-guest"
    images.mkdir(parents=True)
    (images / "vmlinuz").write_bytes(b"not a kernel")
    settings = ControllerSettings(
        data_dir=data_dir, port_range="20000-20009", workers=2, backoff_base_seconds=0.05, resync_seconds=0.5
    )
    db = await open_database(data_dir)
    stop = asyncio.Event()
    controller = Controller(settings, db, metrics=metrics)
    if before_start is not None:
        await before_start(controller)
    task = asyncio.create_task(controller.run(stop))
    try:
        yield Harness(db, StateStore(db), VMStatusWriter(db), Allocations(db), settings, controller)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await db.close()


@pytest.fixture
async def harness(tmp_path: Path, fake_qemu: Path) -> AsyncIterator[Harness]:
    async with controller_on(tmp_path) as running:
        yield running


SPEC: dict[str, Any] = {"accel": "tcg", "network": {"forwards": [{"guestPort": 80}]}}


async def test_qemu_failing_at_start_crash_loops_with_its_stderr(harness: Harness) -> None:
    """A QEMU that exits at start is a crash with its stderr in lastExit, and restarts back off."""
    await harness.declare({"web": SPEC})
    status = await harness.wait_for("web", lambda s: s.failures >= 3)
    assert status.last_exit is not None
    assert status.last_exit.reason.value == "crashed"
    assert "could not load kernel" in status.last_exit.message
    assert status.pid is None
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert ready.status.value == "False"
    backing_off = await harness.wait_for("web", lambda s: s.phase.value == "CrashLoopBackOff")
    assert backing_off.next_retry_at is not None


async def test_missing_image_waits_with_a_condition(harness: Harness) -> None:
    """A kernel missing from the images dir is a Pending VM whose Ready condition names the file."""
    await harness.declare({"web": {**SPEC, "boot": {"kernel": "nowhere/vmlinuz"}}})
    status = await harness.wait_for("web", lambda s: any(c.reason == "ImageNotFound" for c in s.conditions))
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert "nowhere/vmlinuz" in ready.message
    assert (status.phase.value, status.restarts, status.last_exit) == ("Pending", 0, None)


async def test_disk_image_linked_outside_the_images_dir_is_refused(harness: Harness, tmp_path: Path) -> None:
    """A base image that is a symlink out of the images dir never becomes a disk."""
    outside = tmp_path / "secret.raw"
    outside.write_bytes(b"\0" * 4096)
    (harness.settings.resolved_images_dir / "evil.raw").symlink_to(outside)
    await harness.declare({"web": {**SPEC, "disks": [{"name": "root", "image": "evil.raw"}]}})
    status = await harness.wait_for("web", lambda s: any(c.reason == "ImageNotFound" for c in s.conditions))
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert "disk 'root': image 'evil.raw' resolves outside the images dir" in ready.message
    assert status.phase is Phase.PENDING
    assert list(harness.settings.data_dir.glob("disks/*/*.qcow2")) == []


async def test_port_held_by_a_foreign_process_is_skipped(harness: Harness) -> None:
    """The allocator probes by bind and skips a port some other program listens on."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 20000))
        squatter.listen()
        await harness.declare({"web": SPEC})
        status = await harness.wait_for("web", lambda s: bool(s.ports))
    assert [p.host_port for p in status.ports] == [20001]


async def test_requested_busy_host_port_is_reported(harness: Harness) -> None:
    """A hostPort that another program holds is a visible error, not a silent reassignment."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 20005))
        squatter.listen()
        await harness.declare(
            {"web": {**SPEC, "network": {"forwards": [{"guestPort": 80, "hostPort": 20005}]}}}
        )
        status = await harness.wait_for(
            "web", lambda s: any(c.reason == "ReconcileError" for c in s.conditions)
        )
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert "hostPort tcp/20005 is in use" in ready.message


async def test_stale_runtime_dir_of_an_unknown_vm_is_removed(harness: Harness) -> None:
    """A runtime dir left by a VM the store no longer knows (dead process) is cleaned up."""
    orphan = harness.settings.data_dir / "run" / str(uuid.uuid4())
    orphan.mkdir(parents=True)
    (orphan / "launch.json").write_text(
        json.dumps(
            {
                "argv": ["qemu"],
                "digest": "d",
                "pid": 2**22 - 1,
                "startTicks": 1,
                "startedAt": "2026-11-21T00:00:00+00:00",
            }
        )
    )
    await wait_until_async(lambda: not orphan.exists())


async def test_deleting_a_crash_looping_vm_releases_everything(harness: Harness) -> None:
    """Deletion during backoff releases the port and runtime dir and removes the object."""
    await harness.declare({"web": SPEC})
    uid, _ = await harness.status_of("web")
    await harness.wait_for("web", lambda s: s.failures >= 2)
    await harness.declare({})
    await wait_until_async(lambda: _gone(harness, uid), what="the object removed")
    assert await harness.allocations.ports() == []
    assert not (harness.settings.data_dir / "run" / uid).exists()


async def _gone(harness: Harness, uid: str) -> bool:
    return await harness.objects.get(uid) is None
