"""The only code that changes the world: performs a plan's actions for one VM, in order.

It reaches the world through Protocols only: the Hypervisor (processes, runtime dir), the store
(api/store/contracts.py), ports, disks and the image cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, assert_never

import structlog
from opentelemetry import trace

from api.images import RemoteImage
from api.store.contracts import StatusStore
from api.store.records import DiskOwner
from controller.actions import (
    Action,
    AllocatePorts,
    Attach,
    AttachPasst,
    AttachTpm,
    CleanRuntime,
    Continue,
    CreateDisk,
    DeleteDisk,
    FetchImage,
    Finalize,
    GrowDisk,
    Kill,
    KillLost,
    Pause,
    PrepareNvram,
    Quit,
    RecordExit,
    ReleasePorts,
    RemoveRuntimeDir,
    RequestGuestShutdown,
    RequestPowerdown,
    Spawn,
    StartPasst,
    StartTpm,
    StopPasst,
    StopTpm,
    Unpause,
    WriteSeed,
)
from controller.clock import Clock
from controller.errors import TerminalError, TransientError
from controller.faults import CrashPoint, crash_point
from controller.firmware import TpmEmulators, TpmFailed
from controller.hypervisor import AlreadyRunning, CommandRefused, CommandUnanswered, Hypervisor
from controller.network import PasstFailed, PasstNetworks
from controller.qemu.argv import RuntimePaths
from controller.qemu.guest_agent import AgentUnavailable
from controller.resources.disks import DiskBusy, DiskError, DiskManager
from controller.resources.nvram import NvramManager
from controller.resources.ports import PortAllocator, PortUnavailable
from controller.telemetry import TRACER, BootSpans

log = structlog.get_logger(__name__)


class GuestShutdowns(Protocol):
    """The guest agents, as the executor uses them (controller/guest_agents.py)."""

    async def shutdown(self, directory: Path) -> None: ...


class ImageFetcher(Protocol):
    def fetch(self, source: RemoteImage, *, waiter: str) -> None: ...


class Executor:
    def __init__(
        self,
        *,
        hypervisor: Hypervisor,
        ports: PortAllocator,
        disks: DiskManager,
        objects: StatusStore,
        clock: Clock,
        boots: BootSpans,
        images: ImageFetcher | None = None,
        nvram: NvramManager | None = None,
        tpms: TpmEmulators | None = None,
        agents: GuestShutdowns | None = None,
        passts: PasstNetworks | None = None,
        may_spawn: Callable[[], bool] = lambda: True,
    ) -> None:
        """`may_spawn()`: False while this host is fenced (controller/host_agent.py)."""
        self._may_spawn = may_spawn
        self._agents = agents
        self._passts = passts
        self._nvram = nvram
        self._tpms = tpms
        self._images = images
        self._boots = boots
        self._hypervisor = hypervisor
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
            case CreateDisk() | GrowDisk() | DeleteDisk():
                await self._disk(uid, action)
            case WriteSeed(path=path, files=files):
                await self._hypervisor.write_seed(path, dict(files))
            case PrepareNvram() | StartTpm() | AttachTpm() | StopTpm():
                await self._firmware(uid, paths, action)
            case StartPasst() | AttachPasst() | StopPasst():
                await self._network(uid, paths, action)
            case Spawn():
                await self._spawn(uid, paths, action)
            case Continue() | Unpause():
                await self._qmp(uid, "cont")
            case Pause():
                await self._qmp(uid, "stop")
            case RequestPowerdown():
                await self._qmp(uid, "system_powerdown")
            case RequestGuestShutdown():
                await self._guest_shutdown(uid, paths)
            case Quit():
                await self._qmp(uid, "quit")
            case Kill(pid=pid, signal=signal):
                await self._hypervisor.signal(uid, paths, pid, signal)
            case KillLost(pid=pid):
                await self._hypervisor.kill_lost(uid, paths, pid)
            case Attach(pid=pid):
                await self._hypervisor.attach(uid, paths, pid)
            case RecordExit(pid=pid):
                await self._hypervisor.record_exit(uid, paths, pid)
            case CleanRuntime():
                await self._hypervisor.clean(uid, paths)
            case RemoveRuntimeDir():
                await self._hypervisor.remove(uid, paths)
            case Finalize():
                await self._objects.finalize(uid)
            case _:
                assert_never(action)

    async def _disk(self, uid: str, action: CreateDisk | GrowDisk | DeleteDisk) -> None:
        match action:
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

    async def _firmware(
        self, uid: str, paths: RuntimePaths, action: PrepareNvram | StartTpm | AttachTpm | StopTpm
    ) -> None:
        """The NVRAM and the swtpm (docs/firmware.md)."""
        if isinstance(action, PrepareNvram):
            if self._nvram is None:
                raise TerminalError("this controller keeps no NVRAM files")
            try:
                await self._nvram.prepare(uid, action)
            except DiskBusy as err:
                raise TransientError(str(err)) from err
            except DiskError as err:
                raise TerminalError(str(err)) from err
            return
        if self._tpms is None:
            raise TerminalError("this controller runs no swtpm")
        match action:
            case StartTpm(persistent=persistent):
                try:
                    await self._tpms.start(uid, paths, persistent=persistent)
                except TpmFailed as err:
                    raise TransientError(str(err)) from err
            case AttachTpm(pid=pid):
                await self._tpms.attach(uid, paths, pid)
            case StopTpm():
                await self._tpms.stop(uid, paths)

    async def _network(
        self, uid: str, paths: RuntimePaths, action: StartPasst | AttachPasst | StopPasst
    ) -> None:
        """The VM's passt (docs/networking.md)."""
        if self._passts is None:
            raise TerminalError("this controller runs no passt")
        match action:
            case StartPasst(argv=argv):
                try:
                    await self._passts.start(uid, paths, argv)
                except PasstFailed as err:
                    raise TransientError(str(err)) from err
            case AttachPasst(pid=pid):
                await self._passts.attach(uid, paths, pid)
            case StopPasst():
                await self._passts.stop(uid, paths)

    async def _spawn(self, uid: str, paths: RuntimePaths, action: Spawn) -> None:
        """Start QEMU and return once it is watched (and continued, with `resume`); an early
        exit is recorded, not raised."""
        if not self._may_spawn():
            raise TransientError(
                "this host's lease may have run out (fenced): no QEMU starts until it is renewed"
            )
        since = (time.time_ns(), time.monotonic())
        try:
            spawned = await self._hypervisor.spawn(uid, paths, action.argv, action.digest)
        except AlreadyRunning as err:
            raise TransientError(str(err)) from err
        # Before any `cont`: a controller killed here finds its guest still in prelaunch.
        crash_point(CrashPoint.AFTER_SPAWN)
        if spawned is None:
            return
        trace.get_current_span().set_attribute("process.pid", spawned.pid)
        self._boots.started(uid, pid=spawned.pid, argv_digest=action.digest, since=since)
        self._boots.event(uid, "qmp ready" if spawned.monitor_ready else "qmp unavailable")
        if action.resume and spawned.monitor_ready:
            try:
                await self._hypervisor.command(uid, "cont")
            except (CommandUnanswered, CommandRefused) as err:
                # Not this pass's failure: the next one sees the guest in prelaunch and retries.
                log.info("cont_deferred", uid=uid, pid=spawned.pid, error=str(err))

    async def _guest_shutdown(self, uid: str, paths: RuntimePaths) -> None:
        """guest-shutdown; the power button instead when the agent no longer answers (it
        answered the last ask, but a guest can stop its agent at any time)."""
        try:
            if self._agents is None:
                raise AgentUnavailable("this controller talks to no guest agents")
            await self._agents.shutdown(Path(paths.directory))
        except AgentUnavailable as err:
            log.info("guest_shutdown_unavailable", uid=uid, error=str(err))
            await self._qmp(uid, "system_powerdown")

    async def _qmp(self, uid: str, command: str) -> None:
        try:
            await self._hypervisor.command(uid, command)
        except CommandUnanswered as err:
            if command == "quit":
                return  # QEMU may close the socket before it replies to quit
            raise TransientError(str(err)) from err
        except CommandRefused as err:
            raise TransientError(str(err)) from err


# Where crash-consistency tests kill the controller: right after each step that changes the world
# (AFTER_SPAWN is inside `_spawn`, before its `cont`).
_CRASH_POINTS: dict[type[Action], CrashPoint] = {
    AllocatePorts: CrashPoint.AFTER_PORT_ALLOCATION,
    CreateDisk: CrashPoint.AFTER_DISK_CREATION,
    RequestPowerdown: CrashPoint.MID_STOP,
    RequestGuestShutdown: CrashPoint.MID_STOP,
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
    PrepareNvram: "nvram prepare",
    StartTpm: "tpm start",
    AttachTpm: "tpm attach",
    StopTpm: "tpm stop",
    StartPasst: "passt start",
    AttachPasst: "passt attach",
    StopPasst: "passt stop",
    Spawn: "spawn",
    Kill: "kill",
    KillLost: "kill",
    Attach: "attach",
    RecordExit: "record exit",
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
