"""A read-only look at one VM: runtime dir, pidfile, /proc, QMP, and the resource ledger.

Two bookkeeping effects are allowed here, because observing is where they become known:
a live process of ours is attached to the runtime (its exit and events get watched), and a
process found dead with no exit record (it died while no controller watched) gets one, so the
exit is counted exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from api.images import CachedImage, LocalImage, RemoteImage
from api.store.allocations import Allocations
from api.types import QemuVMSpec
from controller import host_memory
from controller.clock import Clock
from controller.layout import image_problem
from controller.model import DiskRecord, ImageLookup, ImageState, Observed, ProcessObservation
from controller.qemu import process
from controller.qemu.argv import RuntimePaths
from controller.qemu.runtime import Runtime
from controller.resources.disks import filesystem_space


class ImageLookups(Protocol):
    """The image cache, as observing sees it: a look at what is cached, never a download."""

    def lookup(self, source: CachedImage | RemoteImage) -> ImageLookup: ...


async def observe(
    uid: str,
    paths: RuntimePaths,
    *,
    spec: QemuVMSpec | None,
    runtime: Runtime,
    allocations: Allocations,
    images_dir: Path,
    clock: Clock,
    images: ImageLookups | None = None,
    expect_process: bool = False,
    disks_root: Path | None = None,
) -> Observed:
    """`expect_process`: status names a pid, so a process missing from the records is looked for.
    `disks_root`: where disks are made, whose free space is read when the spec sizes disks."""
    directory = Path(paths.directory)
    # A process the runtime watches was proven ours when it was attached; the files on disk
    # are read (and proven against /proc) only for one it does not watch yet.
    watched = runtime.attached_record(uid)
    record: process.LaunchRecord | None
    if watched is not None:
        record = watched
        alive = process.is_alive_and_ours(watched, identity_proven=True)
    else:
        record = process.read_launch_record(paths)
        pidfile_pid = process.read_pidfile(paths)
        alive = (
            record is not None
            and (pidfile_pid is None or pidfile_pid == record.pid)
            and process.is_alive_and_ours(record)
        )
    found: ProcessObservation | None = None
    if alive and record is not None:
        await runtime.attach(uid, paths, record)
        found = ProcessObservation(
            pid=record.pid,
            argv_digest=record.digest,
            started_at=record.started_at,
            qmp=await runtime.qmp_state(uid),
            runtime_intact=Path(paths.qmp_socket).exists(),
            guest_booted=runtime.guest_booted(uid),
        )
    # QEMU's leader shows as a zombie for a few ms while its other threads exit; the runtime's
    # pidfd fires only when all are gone and then records the exit. Until then it is "exiting".
    exiting = found is None and record is not None and runtime.is_attached(uid, record.pid)
    exit_record = process.read_exit_record(paths)
    if found is None and not exiting and record is not None and exit_record is None:
        # It died while no controller watched it: record the exit once, now (with the wait
        # status its supervisor recorded, if it had one).
        process.record_exit(paths, record, now=clock.now())
        exit_record = process.read_exit_record(paths)
    stale = (
        found is None
        and not exiting
        and any(
            Path(path).exists() for path in (paths.pidfile, paths.qmp_socket, paths.record, paths.exit_record)
        )
    )
    ports, disk_rows = await allocations.held_by(uid)
    disks = {
        row.name: DiskRecord(
            row.name, row.reclaim_policy, Path(row.path).exists(), Path(row.path), row.size_mib
        )
        for row in disk_rows
    }
    return Observed(
        process=found,
        exit=exit_record,
        has_runtime_dir=directory.is_dir(),
        has_stale_runtime=stale,
        exiting=exiting,
        ports={(row.protocol, row.guest_port): row.host_port for row in ports},
        disks=disks,
        missing_images=_missing_images(spec, images_dir) if found is None else (),
        bases=_bases(spec, disks, images_dir, images),
        host_memory_available_mib=host_memory.available_mib() if found is None else None,
        lost_pid=process.find_lost(paths) if expect_process and record is None else None,
        storage=filesystem_space(disks_root)
        if disks_root is not None and spec is not None and any(disk.size for disk in spec.disks)
        else None,
    )


def _bases(
    spec: QemuVMSpec | None, disks: Mapping[str, DiskRecord], images_dir: Path, images: ImageLookups | None
) -> dict[str, ImageLookup]:
    """Where the base image of each disk that has no file yet stands."""
    if spec is None:
        return {}
    bases = {}
    for disk in spec.disks:
        record = disks.get(disk.name)
        source = disk.source
        if source is None or (record is not None and record.exists):
            continue
        if isinstance(source, LocalImage):
            problem = image_problem(images_dir, source.path)
            bases[disk.name] = (
                ImageLookup(ImageState.READY, path=(images_dir / source.path).resolve())
                if problem is None
                else ImageLookup(ImageState.MISSING, reason="ImageNotFound", message=problem)
            )
        elif images is not None:
            bases[disk.name] = images.lookup(source)
        else:
            bases[disk.name] = ImageLookup(
                ImageState.MISSING, reason="ImageNotFound", message="this controller has no image cache"
            )
    return bases


def _missing_images(spec: QemuVMSpec | None, images_dir: Path) -> tuple[str, ...]:
    """Boot files (kernel, initrd) that are not usable files of the images dir."""
    if spec is None:
        return ()
    wanted: list[str] = []
    if spec.boot is not None:
        wanted += [spec.boot.kernel] + ([spec.boot.initrd] if spec.boot.initrd else [])
    return tuple(name for name in wanted if image_problem(images_dir, name) is not None)
