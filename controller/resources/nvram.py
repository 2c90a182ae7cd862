"""The per-VM NVRAM (UEFI variables): a copy of OVMF's vars template, kept like a disk.

It is recorded in the disk ledger before its file exists and made under a temporary name, as a
disk is (controller/resources/disks.py), so a crash leaves nothing unaccounted for and never a
half-copied file taken for a whole one. Its reclaim policy, listing, adoption by a re-created VM
of the same name and deletion are then those of a disk.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from api.store.contracts import AllocationLedger
from api.store.records import DiskHeld, DiskOwner, DiskRow
from api.types import ReclaimPolicy
from controller.actions import PrepareNvram
from controller.resources.disks import MIB, DiskBusy, DiskError

# OVMF's 4 MiB build has a 528 KiB vars store: a template far larger is not one.
TEMPLATE_MAX_BYTES = 8 * MIB


class NvramManager:
    def __init__(self, allocations: AllocationLedger) -> None:
        self._allocations = allocations

    async def prepare(self, uid: str, action: PrepareNvram) -> None:
        """Make the VM's NVRAM (idempotent: an existing file is kept), or adopt the retained one
        of a gone VM of the same name when this one retains it too.

        :raise DiskError: the template is missing or not a vars store.
        :raise DiskBusy: the retained NVRAM still belongs to a VM being deleted.
        """
        owner = DiskOwner(action.project, action.vm_name)
        if action.reclaim_policy is ReclaimPolicy.RETAIN:
            try:
                if await self._allocations.adopt_retained_disk(uid, owner, action.name) is not None:
                    return
            except DiskHeld as err:
                raise DiskBusy(str(err)) from err
        template, target = Path(action.template), Path(action.path)
        try:
            size = template.stat().st_size
        except OSError as err:
            raise DiskError(f"OVMF vars template {template}: {err.strerror}") from err
        if not template.is_file() or size > TEMPLATE_MAX_BYTES:
            raise DiskError(f"OVMF vars template {template} is not a vars file")
        row = DiskRow(
            uid, action.name, str(target), action.reclaim_policy, -(-size // MIB), str(template), owner
        )
        await self._allocations.record_disk(uid, row)
        if not target.exists():
            await asyncio.to_thread(_copy_private, template, target)


def _copy_private(template: Path, target: Path) -> None:
    """Copy `template` to `target`, readable by the server only, complete or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = target.with_name(target.name + ".partial")
    data = template.read_bytes()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    partial.replace(target)
