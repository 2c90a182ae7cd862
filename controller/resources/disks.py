"""VM disks: qcow2 overlays on base images, or blank qcow2 disks; grown, adopted, deleted.

The disk is recorded in the store before its file exists and forgotten only after the file is
gone, so a crash at any point leaves nothing unaccounted for. The file is created under a
temporary name and renamed, so a half-made disk is never taken for a finished one.

A base image is only trusted as raw or qcow2 without a backing file or external data file:
either could name a host file (a downloaded qcow2 whose backing file is /etc/shadow), and
QEMU would read it into the guest. The overlay names the base's format explicitly (-F), so
nothing is probed at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.store.contracts import AllocationLedger
from api.store.records import DiskHeld, DiskOwner, DiskRow
from api.types import DiskSpec, ReclaimPolicy
from controller.model import Storage

QEMU_IMG = "qemu-img"
QEMU_IMG_TIMEOUT_SECONDS = 60.0
MIB = 1024 * 1024
BASE_FORMATS = frozenset({"qcow2", "raw"})


class DiskError(Exception):
    """A disk cannot be made from this spec (unsafe image, shrinking). Terminal."""


class DiskBusy(Exception):
    """The disk cannot be made yet (a retained disk is still held). Retry later."""


def filesystem_space(path: Path, statvfs: Callable[[Path], os.statvfs_result] = os.statvfs) -> Storage | None:
    """The size of the filesystem holding `path` and the space an unprivileged writer still has
    there (f_bavail: root's reserved blocks are not ours to plan with); None when unknown."""
    try:
        found = statvfs(path)
    except OSError:
        return None
    return Storage(
        total_mib=found.f_blocks * found.f_frsize // MIB, available_mib=found.f_bavail * found.f_frsize // MIB
    )


class DiskManager:
    def __init__(self, allocations: AllocationLedger, *, disks_dir: Path) -> None:
        self._allocations = allocations
        self._disks_dir = disks_dir

    def directory(self, uid: str) -> Path:
        return self._disks_dir / uid

    def path(self, uid: str, name: str) -> Path:
        return self.directory(uid) / f"{name}.qcow2"

    async def create(self, uid: str, owner: DiskOwner, disk: DiskSpec, base: Path | None) -> None:
        """Create the disk file (idempotent: an existing file is kept), or adopt the retained
        disk of a gone VM of the same name when this one retains it too.

        :raise DiskError: the base image is unusable, or smaller than `disk.size` allows.
        :raise DiskBusy: the retained disk still belongs to a VM being deleted.
        """
        if disk.reclaim_policy is ReclaimPolicy.RETAIN:
            try:
                if await self._allocations.adopt_retained_disk(uid, owner, disk.name) is not None:
                    return
            except DiskHeld as err:
                raise DiskBusy(str(err)) from err
        target = self.path(uid, disk.name)
        argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
        size_mib = disk.size
        if base is not None:
            image_format, base_size_mib = await _base_info(base)
            if disk.size is not None and disk.size < base_size_mib:
                raise DiskError(
                    f"disk {disk.name!r}: size {disk.size} MiB is smaller than its image"
                    f" ({base_size_mib} MiB); shrinking is refused"
                )
            size_mib = disk.size if disk.size is not None else base_size_mib
            argv += ["-b", str(base), "-F", image_format]
        row = DiskRow(
            uid, disk.name, str(target), disk.reclaim_policy, size_mib, str(base) if base else None, owner
        )
        await self._allocations.record_disk(uid, row)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = target.with_name(target.name + ".partial")
        argv.append(str(partial))
        if disk.size is not None:
            argv.append(f"{disk.size}M")
        await _run(argv)
        partial.replace(target)

    async def grow(self, uid: str, name: str, path: Path, size_mib: int) -> None:
        """Grow the disk to `size_mib` (the guest sees it at its next boot). Never shrinks.

        :raise DiskError: the file is larger than `size_mib`: shrinking is refused.
        """
        info = await _image_info(path)
        current_mib = -(-_virtual_size(info, path) // MIB)
        if size_mib < current_mib:
            raise DiskError(f"disk {name!r} is {current_mib} MiB; shrinking to {size_mib} MiB is refused")
        if size_mib > current_mib:
            await _run([QEMU_IMG, "resize", "-q", "-f", "qcow2", str(path), f"{size_mib}M"])
        await self._allocations.set_disk_size(uid, name, size_mib)

    async def delete(self, uid: str, name: str, path: Path) -> None:
        """Delete the disk file, then forget it. A missing file is success."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(FileNotFoundError, OSError):
            path.parent.rmdir()
        await self._allocations.forget_disk(uid, name)


async def _base_info(path: Path) -> tuple[str, int]:
    """The base image's format and virtual size in MiB. :raise DiskError: not a safe base."""
    info = await _image_info(path)
    image_format = info.get("format")
    if image_format not in BASE_FORMATS:
        raise DiskError(f"image {path.name}: format {image_format!r} is not supported (raw or qcow2)")
    if info.get("backing-filename") is not None or info.get("full-backing-filename") is not None:
        raise DiskError(f"image {path.name} has a backing file; only standalone images can be a base")
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and data.get("data-file") is not None:
        raise DiskError(f"image {path.name} has an external data file; it cannot be a base")
    return str(image_format), -(-_virtual_size(info, path) // MIB)


async def _image_info(path: Path) -> dict[str, Any]:
    """`qemu-img info` of one file, without opening its backing chain. `-U`: the image may be
    open by running VMs."""
    output = await _run([QEMU_IMG, "info", "-U", "--output=json", str(path)])
    info = json.loads(output)
    if not isinstance(info, dict):
        raise DiskError(f"qemu-img info {path.name}: unexpected output")
    return info


def _virtual_size(info: dict[str, Any], path: Path) -> int:
    size = info.get("virtual-size")
    if not isinstance(size, int):
        raise DiskError(f"qemu-img info {path.name}: no virtual size")
    return size


async def _run(argv: list[str]) -> str:
    """Run qemu-img with a deadline. :raise DiskError: it failed; the message is its stderr."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(QEMU_IMG_TIMEOUT_SECONDS):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise DiskError(f"{' '.join(argv[:2])} took longer than {QEMU_IMG_TIMEOUT_SECONDS:.0f} s") from None
    if process.returncode != 0:
        raise DiskError(f"{' '.join(argv[:2])} failed: {stderr.decode(errors='replace').strip()}")
    return stdout.decode()


# snapshots: controller/snapshot_disks.py runs qemu-img the same way.
run_qemu_img = _run
image_info = _image_info
