"""VM disks: qcow2 overlays on base images from the images dir, or blank qcow2 disks.

The disk is recorded in the store before its file exists and forgotten only after the file is
gone, so a crash at any point leaves nothing unaccounted for. The file is created under a
temporary name and renamed, so a half-made disk is never taken for a finished one.
Base images are resolved inside the images dir only: a symlink pointing out is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from api.store.allocations import Allocations
from api.types import DiskSpec
from controller.layout import image_problem

QEMU_IMG = "qemu-img"
QEMU_IMG_TIMEOUT_SECONDS = 60.0
MIB = 1024 * 1024


class DiskError(Exception):
    """A disk cannot be made from this spec (missing or unsafe image, shrinking). Terminal."""


class DiskManager:
    def __init__(self, allocations: Allocations, *, images_dir: Path, disks_dir: Path) -> None:
        self._allocations = allocations
        self._images_dir = images_dir
        self._disks_dir = disks_dir

    def directory(self, uid: str) -> Path:
        return self._disks_dir / uid

    def path(self, uid: str, name: str) -> Path:
        return self.directory(uid) / f"{name}.qcow2"

    def base_image(self, image: str) -> Path:
        """The image file inside the images dir. :raise DiskError: missing, or a link out of it."""
        problem = image_problem(self._images_dir, image)
        if problem is not None:
            raise DiskError(problem)
        return (self._images_dir / image).resolve()

    async def create(self, uid: str, disk: DiskSpec) -> None:
        """Create the disk file (idempotent: an existing file is kept)."""
        target = self.path(uid, disk.name)
        await self._allocations.record_disk(uid, disk.name, str(target), disk.reclaim_policy)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = target.with_name(target.name + ".partial")
        argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
        if disk.image is not None:
            base = self.base_image(disk.image)
            image_format, virtual_size = await _image_info(base)
            base_size_mib = -(-virtual_size // MIB)
            if disk.size is not None and disk.size < base_size_mib:
                raise DiskError(
                    f"disk {disk.name!r}: size {disk.size} MiB is smaller than its image"
                    f" ({base_size_mib} MiB); shrinking is refused"
                )
            argv += ["-b", str(base), "-F", image_format]
        argv.append(str(partial))
        if disk.size is not None:
            argv.append(f"{disk.size}M")
        await _run(argv)
        partial.replace(target)

    async def delete(self, uid: str, name: str) -> None:
        """Delete the disk file, then forget it. A missing file is success."""
        with contextlib.suppress(FileNotFoundError):
            self.path(uid, name).unlink()
        with contextlib.suppress(FileNotFoundError, OSError):
            self.directory(uid).rmdir()
        await self._allocations.forget_disk(uid, name)


async def _image_info(path: Path) -> tuple[str, int]:
    """The image's format and virtual size in bytes. `-U`: the base may be open by running VMs."""
    output = await _run([QEMU_IMG, "info", "-U", "--output=json", str(path)])
    info = json.loads(output)
    image_format = info.get("format") if isinstance(info, dict) else None
    size = info.get("virtual-size") if isinstance(info, dict) else None
    if not isinstance(image_format, str) or not isinstance(size, int):
        raise DiskError(f"qemu-img info {path.name}: unexpected output")
    return image_format, size


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
