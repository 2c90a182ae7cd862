"""Incremental resync on real files and real processes (controller/resync_inputs.py): an unchanged
VM is skipped; one whose runtime dir was removed, whose process was killed while nobody watched,
or whose exit was recorded is found by the next pass; every VM by the full pass. And the same
through a running controller."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from api.infra.metrics import Metrics
from api.store.records import DiskRow, PortRow
from api.testing.waiting import wait_until_async
from api.types import Phase, Protocol, ReclaimPolicy
from controller.clock import ManualClock
from controller.layout import DataLayout
from controller.qemu import process
from controller.resync_inputs import IncrementalResync
from controller.sources import Inventory
from tests.component.test_controller_failures import controller_on, fake_qemu

__all__ = ["fake_qemu"]  # a fixture used by this module's tests

FULL_EVERY = 300.0
NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield child
    child.kill()
    child.wait()


class Host:
    """Two VMs' runtime dirs and ledger rows; "b" has a watched process."""

    def __init__(self, root: Path, child: subprocess.Popen[bytes]) -> None:
        self.layout = DataLayout(root / "data", root / "data" / "images")
        self.clock = ManualClock()
        self.metrics = Metrics()
        stat = process.read_stat(child.pid)
        assert stat is not None
        self.record = process.LaunchRecord(
            argv=("qemu",),
            digest="d",
            pid=child.pid,
            start_ticks=stat.start_ticks,
            started_at=datetime.now(UTC),
        )
        self.versions = {"a": 1, "b": 1}
        self.disk = root / "a.qcow2"
        self.disk.write_bytes(b"")
        for uid in ("a", "b"):
            paths = self.layout.runtime(uid)
            Path(paths.directory).mkdir(parents=True)
            Path(paths.record).write_text(self.record.encode())
        self.resync = IncrementalResync(
            layout=self.layout,
            watched=lambda uid: self.record if uid == "b" else None,
            full_every=FULL_EVERY,
            clock=self.clock,
            metrics=self.metrics,
        )

    def inventory(self) -> Inventory:
        return Inventory(
            versions=dict(self.versions),
            runtime_uids=frozenset(self.layout.runtime_uids()),
            ports=[PortRow("a", Protocol.TCP, 22, 20000)],
            disks=[DiskRow("a", "root", str(self.disk), ReclaimPolicy.DELETE)],
        )

    def choose(self, *, after: float = 30.0) -> tuple[str, ...]:
        self.clock.advance(after)
        return self.resync(self.inventory())

    def counted(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value("tofu_qemu_resync_keys_total", {"outcome": outcome})
        return value or 0.0


@pytest.fixture
def host(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> Host:
    return Host(tmp_path, sleeper)


def test_unchanged_vms_are_skipped_and_counted(host: Host) -> None:
    assert host.choose() == ("a", "b")  # the first pass is full
    assert host.choose() == ()
    assert host.choose() == ()
    assert (host.counted("queued"), host.counted("skipped")) == (2, 4)


def test_a_removed_runtime_dir_is_found_by_the_next_pass(host: Host) -> None:
    host.choose()
    paths = host.layout.runtime("a")
    os.unlink(paths.record)
    os.rmdir(paths.directory)
    assert host.choose() == ("a",)


def test_a_process_killed_while_no_event_came_is_found_by_the_next_pass(
    host: Host, sleeper: subprocess.Popen[bytes]
) -> None:
    host.choose()
    sleeper.send_signal(signal.SIGKILL)
    sleeper.wait()
    assert host.choose() == ("b",)


def test_an_exit_record_a_version_or_a_deleted_disk_is_a_change(host: Host) -> None:
    host.choose()
    Path(host.layout.runtime("b").exit_record).write_text("{}")
    assert host.choose() == ("b",)
    host.versions["a"] = 2
    assert host.choose() == ("a",)
    host.disk.unlink()
    assert host.choose() == ("a",)


def test_the_full_pass_queues_every_vm(host: Host) -> None:
    host.choose()
    assert host.choose(after=FULL_EVERY - 1) == ()
    assert host.choose(after=1.0) == ("a", "b")


def skipped_keys(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("tofu_qemu_resync_keys_total", {"outcome": "skipped"})
    return value or 0.0


async def test_the_controller_skips_a_settled_vm_and_still_finds_a_new_orphan(
    tmp_path: Path, fake_qemu: Path
) -> None:
    """Through Controller.run (a resync every 0.5 s): a VM with nothing to do (an invalid spec)
    is skipped pass after pass, and a runtime dir that appears with no object is queued by the
    next pass and torn down."""
    metrics = Metrics()
    async with controller_on(tmp_path, metrics=metrics) as harness:
        await harness.declare({"bad": {"memory": -1}})
        await harness.wait_for("bad", lambda status: status.phase is Phase.INVALID)
        settled = skipped_keys(metrics)
        await wait_until_async(lambda: skipped_keys(metrics) >= settled + 2)
        orphan = harness.settings.data_dir / "run" / "0b9c1f7e-0000-4000-8000-000000000001"
        orphan.mkdir()
        await wait_until_async(lambda: not orphan.exists())
