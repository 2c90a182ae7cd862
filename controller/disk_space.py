"""Whether a VM's disks fit the filesystem of the disks dir. Pure (statvfs is read by observe).

- A VM whose disks add up to more than the whole filesystem is refused (DiskTooLarge): it could
  never run here, and waiting would hide that.
- A start that creates or grows disks waits (Admitted=False, InsufficientStorage) while the
  filesystem's free space, less what those disks may take once full, is under the reserve.
  Overlays are thin, so a disk's size is a claim, not a use; the check keeps a VM that fills its
  disks from filling the filesystem the store and the other VMs share. Disks that already
  exist are not counted again: they were checked when they were made.
- A disk whose spec size is larger than its file is grown (with a restart); a smaller one is
  refused (DiskShrinkRefused).
"""

from __future__ import annotations

from pathlib import PurePath

from api.types import DiskSpec, QemuVMSpec
from controller.model import Observed, Storage


def _new_disk_mib(spec: QemuVMSpec, observed: Observed) -> int:
    """What the disks to create or grow may take once the guest fills them, in MiB."""
    total = 0
    for disk in spec.disks:
        record = observed.disks.get(disk.name)
        if disk.size is None:
            continue  # an overlay as large as its image: only what the guest writes, unknown here
        if record is None or not record.exists:
            total += disk.size
        elif record.size_mib is not None and disk.size > record.size_mib:
            total += disk.size - record.size_mib
    return total


def storage_shortfall(spec: QemuVMSpec, observed: Observed, reserve_mib: int) -> str:
    """Why the disks dir cannot take this VM's new disk space ("" when it can or is unknown).

    Overlays are thin, so this is a claim on free space, not a use of it: a full guest must not
    fill the filesystem the store and every other VM share."""
    storage = observed.storage
    needed = _new_disk_mib(spec, observed)
    if storage is None or needed == 0 or storage.available_mib - needed >= reserve_mib:
        return ""
    return (
        f"its new disks need {needed} MiB; the disks filesystem has {storage.available_mib} MiB free"
        f" and keeps {reserve_mib} MiB in reserve"
    )


def larger_than_filesystem(spec: QemuVMSpec, storage: Storage | None) -> str:
    """Why the spec's disks can never fit on this host ("" when they can or it is unknown)."""
    total = sum(disk.size or 0 for disk in spec.disks)
    if storage is None or total <= storage.total_mib:
        return ""
    return (
        f"its disks add up to {total} MiB; the filesystem that holds disks is {storage.total_mib} MiB"
        " in all: this host can never hold them"
    )


def shrinking_disks(spec: QemuVMSpec, observed: Observed) -> str:
    """Why the spec's disk sizes cannot be applied (a disk smaller than its file), or ""."""
    problems = []
    for disk in spec.disks:
        record = observed.disks.get(disk.name)
        if record is None or not record.exists or record.size_mib is None or disk.size is None:
            continue
        if disk.size < record.size_mib:
            problems.append(
                f"disk {disk.name!r} is {record.size_mib} MiB; shrinking it to {disk.size} MiB is refused"
                " (set the size back, or rename the disk to replace it)"
            )
    return "; ".join(problems)


def growing_disks(spec: QemuVMSpec, observed: Observed) -> list[tuple[DiskSpec, PurePath]]:
    """Disks whose spec size is larger than their file (or whose file size is not known)."""
    growing = []
    for disk in spec.disks:
        record = observed.disks.get(disk.name)
        if record is None or not record.exists or disk.size is None:
            continue
        if record.size_mib is None or disk.size > record.size_mib:
            growing.append((disk, record.path))
    return growing
