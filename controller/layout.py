"""Where a VM's files live under the data dir. Every path derives from the VM's uid."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from controller.qemu.argv import RuntimePaths


@dataclass(frozen=True, slots=True)
class DataLayout:
    data_dir: Path
    images_dir: Path

    def __post_init__(self) -> None:
        # QEMU runs in the VM's runtime dir: a relative pidfile, socket or disk path handed to it
        # would point nowhere. Settings make every path absolute; this keeps it that way.
        for path in (self.data_dir, self.images_dir):
            if not path.is_absolute():
                raise ValueError(f"{path} is not an absolute path")

    @property
    def run_root(self) -> Path:
        return self.data_dir / "run"

    @property
    def disks_root(self) -> Path:
        return self.data_dir / "disks"

    def runtime(self, uid: str) -> RuntimePaths:
        return RuntimePaths(self.run_root / uid)

    def disks_dir(self, uid: str) -> Path:
        return self.disks_root / uid

    def runtime_uids(self) -> set[str]:
        """uids that have a runtime dir (live, stale or orphaned)."""
        try:
            # scandir: each entry's type comes with the listing, no stat and no Path per entry.
            with os.scandir(self.run_root) as entries:
                return {entry.name for entry in entries if entry.is_dir()}
        except (FileNotFoundError, NotADirectoryError):
            return set()


def image_problem(images_dir: Path, name: str) -> str | None:
    """Why `name` is not usable as a file of the images dir, or None when it is. A symlink may
    point elsewhere inside it, never out: a kernel, initrd or base image is never a host file."""
    candidate = (images_dir / name).resolve()
    if not candidate.is_relative_to(images_dir.resolve()):
        return f"image {name!r} resolves outside the images dir"
    if not candidate.is_file():
        return f"image {name!r} is not in the images dir"
    return None
