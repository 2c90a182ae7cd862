"""A read-only look at one VM: its process (through the Hypervisor), and the resource ledger.

Looking changes nothing. What looking finds that needs doing (a live process nobody watches
yet, an exit nobody recorded) is planned as an action (Attach, RecordExit) like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from api.guest_types import GuestStatus
from api.images import CachedImage, LocalImage, RemoteImage
from api.store.contracts import AllocationLedger
from api.types import QemuVMSpec
from controller import firmware, host_memory, network
from controller.hypervisor import Hypervisor, ProcessView
from controller.layout import image_problem
from controller.model import DiskRecord, ImageLookup, ImageState, Observed, ProcessObservation
from controller.qemu.argv import RuntimePaths
from controller.resources.disks import filesystem_space


class GuestReports(Protocol):
    """The guest agents' last answers (controller/guest_agents.py): reading them does no I/O."""

    def observed(self, uid: str, pid: int) -> GuestStatus | None: ...


class ImageLookups(Protocol):
    """The image cache, as observing sees it: a look at what is cached, never a download."""

    def lookup(self, source: CachedImage | RemoteImage) -> ImageLookup: ...


async def observe(
    uid: str,
    paths: RuntimePaths,
    *,
    spec: QemuVMSpec | None,
    hypervisor: Hypervisor,
    allocations: AllocationLedger,
    images_dir: Path,
    images: ImageLookups | None = None,
    expect_process: bool = False,
    disks_root: Path | None = None,
    tpms: firmware.TpmEmulators | None = None,
    guests: GuestReports | None = None,
    passts: network.PasstNetworks | None = None,
) -> Observed:
    """`expect_process`: status names a pid, so a process missing from the records is looked for.
    `disks_root`: where disks are made, whose free space is read when the spec sizes disks.
    `tpms`: the swtpm processes, looked at for every VM (a stray one is ended); `passts` the same
    for passt."""
    view = await hypervisor.inspect(uid, paths, expect_process=expect_process)
    ports, disk_rows = await allocations.held_by(uid)
    disks = {
        row.name: DiskRecord(
            row.name, row.reclaim_policy, Path(row.path).exists(), Path(row.path), row.size_mib
        )
        for row in disk_rows
    }
    idle = view.process is None
    ledger = Observed(
        process=None,
        exit=None,
        has_runtime_dir=False,
        has_stale_runtime=False,
        ports={(row.protocol, row.guest_port): row.host_port for row in ports},
        disks=disks,
        missing_images=_missing_images(spec, images_dir) if idle else (),
        bases=_bases(spec, disks, images_dir, images),
        host_memory_available_mib=host_memory.available_mib() if idle else None,
        storage=filesystem_space(disks_root)
        if disks_root is not None and spec is not None and any(disk.size for disk in spec.disks)
        else None,
        tpm=await tpms.inspect(uid, paths) if tpms is not None else None,
        missing_firmware=_missing_firmware(spec) if idle else (),
        guest=_guest(uid, view, spec, guests),
        passt=await passts.inspect(uid, paths) if passts is not None else None,
    )
    return with_process(ledger, view)


def with_process(observed: Observed, view: ProcessView) -> Observed:
    """`observed` with its process side looked at again (`view`); the ledger's side is kept.
    What a reconcile sees after actions that touched only the process (spawn, `cont`, a signal)."""
    return replace(
        observed,
        process=_with_agent(view.process, observed.guest),
        exit=view.exit,
        has_runtime_dir=view.has_runtime_dir,
        has_stale_runtime=view.has_stale_runtime,
        exiting=view.exiting,
        lost_pid=view.lost_pid,
        unrecorded_exit_pid=view.unrecorded_exit_pid,
    )


def _guest(
    uid: str, view: ProcessView, spec: QemuVMSpec | None, guests: GuestReports | None
) -> GuestStatus | None:
    if guests is None or spec is None or not spec.guest_agent or view.process is None:
        return None
    return guests.observed(uid, view.process.pid)


def _with_agent(process: ProcessObservation | None, guest: GuestStatus | None) -> ProcessObservation | None:
    if process is None or guest is None or not guest.agent_connected:
        return process
    return replace(process, agent_connected=True)


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


def _missing_firmware(spec: QemuVMSpec | None) -> tuple[str, ...]:
    """OVMF files the spec needs that are not on this host."""
    if spec is None:
        return ()
    return tuple(str(path) for path in firmware.wanted_files(spec) if not Path(path).is_file())


def _missing_images(spec: QemuVMSpec | None, images_dir: Path) -> tuple[str, ...]:
    """Boot files (kernel, initrd) that are not usable files of the images dir."""
    if spec is None:
        return ()
    wanted: list[str] = []
    if spec.boot is not None:
        wanted += [spec.boot.kernel] + ([spec.boot.initrd] if spec.boot.initrd else [])
    return tuple(name for name in wanted if image_problem(images_dir, name) is not None)
