"""The only code that changes the world: performs a plan's actions for one VM, in order."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal as signals
from pathlib import Path
from typing import Protocol, assert_never

import structlog
from opentelemetry import trace

from api.images import RemoteImage
from api.store.allocations import DiskOwner
from api.store.status_writer import VMStatusWriter
from controller.actions import (
    Action,
    AllocatePorts,
    CleanRuntime,
    Continue,
    CreateDisk,
    DeleteDisk,
    FetchImage,
    Finalize,
    GrowDisk,
    Kill,
    KillLost,
    Quit,
    ReleasePorts,
    RemoveRuntimeDir,
    RequestPowerdown,
    Spawn,
    WriteSeed,
)
from controller.clock import Clock
from controller.errors import TerminalError, TransientError
from controller.faults import CrashPoint, crash_point
from controller.qemu import process
from controller.qemu.argv import RuntimePaths
from controller.qemu.monitor import MonitorCommandFailed, MonitorUnavailable
from controller.qemu.runtime import Runtime
from controller.resources.disks import DiskBusy, DiskError, DiskManager
from controller.resources.ports import PortAllocator, PortUnavailable
from controller.resources.seed import write_seed_iso
from controller.telemetry import TRACER, BootSpans

log = structlog.get_logger(__name__)


class ImageFetcher(Protocol):
    def fetch(self, source: RemoteImage, *, waiter: str) -> None: ...


class Executor:
    def __init__(
        self,
        *,
        runtime: Runtime,
        ports: PortAllocator,
        disks: DiskManager,
        objects: VMStatusWriter,
        clock: Clock,
        boots: BootSpans,
        images: ImageFetcher | None = None,
    ) -> None:
        self._images = images
        self._boots = boots
        self._runtime = runtime
        self._ports = ports
        self._disks = disks
        self._objects = objects
        self._clock = clock

    async def execute(self, uid: str, paths: RuntimePaths, action: Action) -> None:
        """Perform one action. Idempotent: repeating a done action is success.

        :raise TransientError: retry later.
        :raise TerminalError: this spec cannot be acted on.
        """
        log.debug("action", uid=uid, action=type(action).__name__)
        name = _SPAN_NAMES.get(type(action))
        if name is None:  # a QMP command: the runtime traces each one it sends
            await self._perform(uid, paths, action)
        else:
            with TRACER.start_as_current_span(name, attributes=_span_attributes(action)):
                await self._perform(uid, paths, action)
        point = _CRASH_POINTS.get(type(action))
        if point is not None:
            crash_point(point)

    async def _perform(self, uid: str, paths: RuntimePaths, action: Action) -> None:
        match action:
            case AllocatePorts(requested=requested):
                try:
                    await self._ports.allocate(uid, requested)
                except PortUnavailable as err:
                    raise TransientError(str(err)) from err
            case ReleasePorts(keys=keys):
                await self._ports.release(uid, keys)
            case FetchImage(source=source):
                if self._images is None:
                    raise TerminalError("this controller has no image cache to download into")
                self._images.fetch(source, waiter=uid)
            case CreateDisk(disk=disk, base=base, project=project, vm_name=vm_name):
                try:
                    owner = DiskOwner(project, vm_name)
                    await self._disks.create(uid, owner, disk, Path(base) if base else None)
                except DiskBusy as err:
                    raise TransientError(str(err)) from err
                except DiskError as err:
                    raise TerminalError(str(err)) from err
            case GrowDisk(name=name, path=path, size_mib=size_mib):
                try:
                    await self._disks.grow(uid, name, Path(path), size_mib)
                except DiskError as err:
                    raise TerminalError(str(err)) from err
            case DeleteDisk(name=name, path=path):
                await self._disks.delete(uid, name, Path(path))
            case WriteSeed(path=path, files=files):
                await asyncio.to_thread(_write_seed, Path(path), dict(files))
            case Spawn(argv=argv, digest=digest):
                await self._spawn(uid, paths, argv, digest)
            case Continue():
                await self._qmp(uid, "cont")
            case RequestPowerdown():
                await self._qmp(uid, "system_powerdown")
            case Quit():
                await self._qmp(uid, "quit")
            case Kill(pid=pid, signal=signal):
                # The watched process's record also serves when its runtime dir is gone.
                record = self._runtime.attached_record(uid) or process.read_launch_record(paths)
                if record is not None and record.pid == pid:
                    process.send_signal(record, signal)
                    log.info("vm_killed", uid=uid, pid=pid, signal=signal)
            case KillLost(pid=pid):
                if process.find_lost(paths) == pid:
                    os.kill(pid, signals.SIGKILL)
                    log.info("vm_killed", uid=uid, pid=pid, signal=signals.SIGKILL, lost=True)
            case CleanRuntime():
                process.clear_stale_files(paths)
            case RemoveRuntimeDir():
                await self._runtime.detach(uid)
                await asyncio.to_thread(shutil.rmtree, paths.directory, True)
            case Finalize():
                await self._objects.finalize(uid)
            case _:
                assert_never(action)

    async def _spawn(self, uid: str, paths: RuntimePaths, argv: tuple[str, ...], digest: str) -> None:
        """Start QEMU and return once it is watched; an early exit is recorded, not raised.

        A QEMU that dies at start (bad kernel, busy port) leaves an exit record with its stderr;
        the next plan counts it as a failure and backs off, the same path as any crash.
        """
        now = self._clock.now()
        try:
            # fork+exec of QEMU takes milliseconds; other VMs' reconciles go on meanwhile.
            child = await asyncio.to_thread(process.spawn, argv, digest, paths, now=now)
        except process.DuplicateProcess as err:
            raise TransientError(str(err)) from err
        except process.SpawnFailed as err:
            Path(paths.stderr_log).write_text(str(err))
            process.write_exit_record(paths, exit_code=127, signal=None, started_at=now, now=now)
            return
        record = process.read_launch_record(paths)
        assert record is not None, "spawn writes the launch record"
        # QEMU's pid; `child` is its supervisor.
        trace.get_current_span().set_attribute("process.pid", record.pid)
        log.info("vm_spawned", uid=uid, pid=record.pid, argv_digest=digest)
        self._boots.started(uid, pid=record.pid, argv_digest=digest)
        await self._runtime.attach(uid, paths, record, child=child)
        self._boots.event(uid, "qmp ready" if self._runtime.monitor(uid) else "qmp unavailable")

    async def _qmp(self, uid: str, command: str) -> None:
        try:
            await self._runtime.execute(uid, command)
        except MonitorUnavailable as err:
            if command == "quit":
                return  # QEMU may close the socket before it replies to quit
            raise TransientError(str(err)) from err
        except MonitorCommandFailed as err:
            raise TransientError(str(err)) from err


def _write_seed(path: Path, files: dict[str, bytes]) -> None:
    """Write this seed and remove older ones (their content is what the spec used to say)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_seed_iso(path, files)
    for old in path.parent.glob("cidata-*.iso"):
        if old != path:
            old.unlink(missing_ok=True)


# Where crash-consistency tests kill the controller: right after each step that changes the world.
_CRASH_POINTS: dict[type[Action], CrashPoint] = {
    AllocatePorts: CrashPoint.AFTER_PORT_ALLOCATION,
    CreateDisk: CrashPoint.AFTER_DISK_CREATION,
    Spawn: CrashPoint.AFTER_SPAWN,
    RequestPowerdown: CrashPoint.MID_STOP,
    ReleasePorts: CrashPoint.AFTER_PORT_RELEASE,
    DeleteDisk: CrashPoint.AFTER_DISK_DELETION,
}
_SPAN_NAMES: dict[type[Action], str] = {
    AllocatePorts: "ports allocate",
    ReleasePorts: "ports release",
    FetchImage: "image fetch",
    CreateDisk: "disk create",
    GrowDisk: "disk grow",
    DeleteDisk: "disk delete",
    WriteSeed: "cloud-init seed",
    Spawn: "spawn",
    Kill: "kill",
    KillLost: "kill",
    CleanRuntime: "clean runtime",
    RemoveRuntimeDir: "remove runtime dir",
    Finalize: "finalize",
}


def _span_attributes(action: Action) -> dict[str, str | int]:
    match action:
        case Spawn(digest=digest):
            return {"tofu_qemu.argv_digest": digest}
        case Kill(pid=pid, signal=signal):
            return {"process.pid": pid, "tofu_qemu.signal": signal}
        case CreateDisk(disk=disk):
            return {"tofu_qemu.disk": disk.name}
        case DeleteDisk(name=name) | GrowDisk(name=name):
            return {"tofu_qemu.disk": name}
        case FetchImage(source=source):
            return {"url.full": source.url}
        case AllocatePorts(requested=requested):
            return {"tofu_qemu.ports": len(requested)}
        case ReleasePorts(keys=keys):
            return {"tofu_qemu.ports": len(keys)}
        case _:
            return {}
