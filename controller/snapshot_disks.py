"""qcow2 internal snapshots of one VM's disks: taken, found, reverted and deleted
(docs/snapshots.md). The I/O of the snapshot controller; the decisions are in snapshot_plan.py.

A running VM's disks are open in its QEMU, so they are snapshotted through QMP: one
`transaction` of `blockdev-snapshot-internal-sync` actions, so that every disk is snapshotted at
the same instant (crash-consistent across disks) or none is. A stopped VM's disks are closed and
`qemu-img snapshot` works on the files (argv lists, no shell, a deadline per call). Only the
files the ledger records for the VM's own uid are ever opened: a restore cannot reach another
VM's disks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from api.snapshots import parse_tag
from controller.faults import CrashPoint, crash_point
from controller.resources.disks import QEMU_IMG, image_info, run_qemu_img

# One transaction drains the guest's in-flight I/O and writes each disk's snapshot table: a
# second under TCG with a busy guest; a minute means QEMU hangs.
SNAPSHOT_QMP_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Disk:
    name: str
    path: Path

    @property
    def node(self) -> str:
        """The block node QEMU knows the disk by (controller/qemu/argv.py)."""
        return f"disk-{self.name}"


class QmpRunner(Protocol):
    """The runtime's one QMP connection to a VM (controller/qemu/runtime.py)."""

    async def qmp(
        self, uid: str, name: str, args: dict[str, object] | None = None, *, within: float
    ) -> object: ...


async def tofu_tags(disk: Disk) -> frozenset[str]:
    """The snapshot tags tofu-qemu wrote into the disk file (`-U`: it may be open in QEMU)."""
    info = await image_info(disk.path)
    found = info.get("snapshots", [])
    names = [item.get("name") for item in found if isinstance(item, dict)] if isinstance(found, list) else []
    return frozenset(name for name in names if isinstance(name, str) and parse_tag(name) is not None)


async def virtual_bytes(disks: Sequence[Disk]) -> int:
    """What the disks can hold: what a snapshot of them may come to pin, at most."""
    total = 0
    for disk in disks:
        size = (await image_info(disk.path)).get("virtual-size")
        total += size if isinstance(size, int) else 0
    return total


async def take_online(qmp: QmpRunner, uid: str, disks: Sequence[Disk], tag: str) -> float:
    """Snapshot every disk of the running VM in one transaction; returns how long it held the
    guest's I/O, in milliseconds (the QMP round trip, an upper bound)."""
    actions = [
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": disk.node, "name": tag}}
        for disk in disks
    ]
    started = time.monotonic()
    await qmp.qmp(uid, "transaction", {"actions": actions}, within=SNAPSHOT_QMP_SECONDS)
    return (time.monotonic() - started) * 1000


async def take_offline(disks: Sequence[Disk], tag: str) -> None:
    for index, disk in enumerate(disks):
        if index == 1:
            crash_point(CrashPoint.MID_SNAPSHOT)
        await run_qemu_img([QEMU_IMG, "snapshot", "-q", "-c", tag, str(disk.path)])


async def delete(qmp: QmpRunner | None, uid: str, disks: Sequence[Disk], tag: str) -> None:
    """Delete `tag` from the disks that hold it: through QMP when the VM runs (`qmp`), else
    with qemu-img."""
    for disk in disks:
        if tag not in await tofu_tags(disk):
            continue
        if qmp is not None:
            arguments: dict[str, object] = {"device": disk.node, "name": tag}
            await qmp.qmp(
                uid, "blockdev-snapshot-delete-internal-sync", arguments, within=SNAPSHOT_QMP_SECONDS
            )
        else:
            await run_qemu_img([QEMU_IMG, "snapshot", "-q", "-d", tag, str(disk.path)])


async def revert(disks: Sequence[Disk], tag: str) -> None:
    """Revert the stopped VM's disks to `tag`. Reverting twice is reverting once: a restore
    retried after a crash reverts again, to the same content."""
    for disk in disks:
        await run_qemu_img([QEMU_IMG, "snapshot", "-q", "-a", tag, str(disk.path)])
