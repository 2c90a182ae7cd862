"""plan(desired, observed, memory, context, now) -> Plan: what to do next for one VM. Pure.

Shape (KubeVirt virt-handler's): first the intents are computed from (spec, observed process),
then one ordered decision picks the actions. A plan never assumes its actions succeed beyond
the memory it returns; `again` asks for the next reconcile at once (requeue 0), so each step
(ports and disks, then spawn, then continue) is decided from a fresh observation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import PurePath

from api.images import RemoteImage
from api.types import Accel, QemuVMSpec, ReclaimPolicy, RunStrategy
from controller import firmware
from controller.actions import (
    Action,
    AllocatePorts,
    Attach,
    CleanRuntime,
    CreateDisk,
    DeleteDisk,
    FetchImage,
    Finalize,
    GrowDisk,
    Kill,
    KillLost,
    Quit,
    RecordExit,
    ReleasePorts,
    RemoveRuntimeDir,
    RequestPowerdown,
    Spawn,
    WriteSeed,
)
from controller.cloudinit import seed_digest, seed_files
from controller.disk_space import growing_disks, larger_than_filesystem, shrinking_disks, storage_shortfall
from controller.exits import absorb_exit, should_restart
from controller.model import (
    Desired,
    ImageState,
    Memory,
    Observed,
    PortKey,
    ProcessObservation,
    QmpState,
)
from controller.pausing import run_state_step
from controller.qemu.argv import LaunchInputs, RuntimePaths, argv_digest, build_argv

# After `system_powerdown` and stopTimeout, `quit` gets this long before SIGKILL.
QUIT_GRACE = timedelta(seconds=5)
# A guest that has not booted (see ProcessObservation.guest_booted) ignores the power button; it
# gets this long to answer it anyway (the tiny guest powers off within 0.2 s), then `quit`.
BOOT_PROBE = timedelta(seconds=2)
# A guest up this long is taken as booted even if no network card ever came up (no virtio-net
# driver, or one that stays promiscuous): cutting its ACPI shutdown to the probe could lose its
# writes, and one still booting after this long gets the full stopTimeout like any other.
BOOT_ASSUMED_AFTER = timedelta(seconds=120)
# QMP may not listen yet just after spawn (the pidfile comes first): wait before calling it hung.
QMP_STARTUP_GRACE = timedelta(seconds=10)
IMAGE_RECHECK = timedelta(seconds=30)
# A download in progress wakes its VMs when it ends; this is only the safety net.
DOWNLOAD_RECHECK = timedelta(seconds=30)
# Which reason a VM waiting on several images shows: the one the user must act on first.
_IMAGE_REASON_ORDER = ("ImageChecksumMismatch", "ImageDownloadFailed", "ImageNotFound", "ImageDownloading")
# A VM waiting for room is looked at again this often (another VM's deletion does not wake it).
ADMISSION_RECHECK = timedelta(seconds=5)
STOP_RECHECK = timedelta(seconds=1)
EXIT_RECHECK = timedelta(milliseconds=50)


class Intent(StrEnum):
    """What the plan is working towards; status turns it into a phase and conditions."""

    INVALID = "Invalid"
    DELETING = "Deleting"
    STOPPING = "Stopping"
    RESTARTING = "Restarting"
    HALTED = "Halted"
    FINISHED = "Finished"
    # The controller is exiting with stop_vms_on_exit: stop, start nothing.
    SHUTTING_DOWN = "ShuttingDown"
    # The spec asks for what cannot be done (shrinking a disk); whatever runs keeps running.
    REFUSED = "Refused"
    PREPARING = "Preparing"
    WAITING_FOR_IMAGES = "WaitingForImages"
    QUOTA_EXCEEDED = "QuotaExceeded"
    HOST_MEMORY_LOW = "HostMemoryLow"
    INSUFFICIENT_STORAGE = "InsufficientStorage"
    BACKING_OFF = "BackingOff"
    STARTING = "Starting"
    RUNNING = "Running"
    # QEMU lives with its guest paused (controller/pausing.py).
    PAUSED = "Paused"
    # Bookkeeping before any decision: attach a process nobody watches, record an exit nobody
    # recorded. Status stays as it was; the next reconcile (at once) decides.
    ADOPTING = "Adopting"


@dataclass(frozen=True, slots=True)
class LaunchContext:
    """Environment facts the argv depends on, resolved by the reconciler before planning."""

    accel: Accel
    runtime: RuntimePaths
    images_dir: PurePath
    disks_dir: PurePath
    # A start must leave the host at least this much available memory.
    memory_reserve_mib: int = 0
    # Creating and growing a VM's disks must leave at least this much free once they are full.
    storage_reserve_mib: int = 0
    # How often a running VM is looked at (its QMP asked) between other events; None: never.
    liveness_period: timedelta | None = None
    forward_address: str = "127.0.0.1"
    shutting_down: bool = False

    def disk_path(self, name: str) -> PurePath:
        return self.disks_dir / f"{name}.qcow2"

    def seed_path(self, digest: str) -> PurePath:
        return self.runtime.directory / f"cidata-{digest}.iso"


@dataclass(frozen=True, slots=True)
class Plan:
    intent: Intent
    memory: Memory
    actions: tuple[Action, ...] = ()
    requeue_after: timedelta | None = None
    # Plan again right after executing: these actions changed the inputs of the next step.
    again: bool = False
    detail: str = ""
    # The condition reason for a waiting or refusing intent, when the intent's name is too vague.
    reason: str = ""


def plan(
    desired: Desired | None, observed: Observed, memory: Memory, context: LaunchContext, *, now: datetime
) -> Plan:
    """Decide the next actions for one VM. `desired` is None for an orphan (no object)."""
    memory = absorb_exit(memory, observed, desired)
    if observed.exiting:
        # Nothing is safe to do until the exit is recorded (the runtime lock is still held).
        return Plan(Intent.STOPPING, memory, requeue_after=EXIT_RECHECK, detail="QEMU is exiting")
    unwatched = _look_after(observed, memory)
    if unwatched is not None:
        return unwatched
    if observed.lost_pid is not None and observed.process is None:
        # Ours but unmanageable (no QMP, no record to adopt it by): replace it, or a second
        # QEMU would be started beside it.
        detail = "a QEMU of this VM lost its runtime dir: killing it"
        actions = (KillLost(observed.lost_pid),)
        return Plan(Intent.RESTARTING, memory, actions, requeue_after=EXIT_RECHECK, detail=detail)
    if desired is None or desired.deleting:
        return _tear_down(desired, observed, memory, now)
    if desired.spec is None:
        # Keep whatever runs: an invalid edit must not take a working VM down.
        return Plan(Intent.INVALID, memory)
    process = observed.process
    if desired.admission.invalid_spec:
        # Valid for the API, not for this host (a hostPort outside its port range): the same.
        return Plan(Intent.INVALID, memory, _hold_nothing(observed), detail=desired.admission.message)
    spec = desired.spec
    if context.shutting_down:
        if process is not None:
            return _stop(process, memory, spec, now, Intent.SHUTTING_DOWN, "tofu-qemu is shutting down")
        return Plan(Intent.SHUTTING_DOWN, memory, detail="tofu-qemu is shutting down")
    if spec.run_strategy is RunStrategy.HALTED or desired.stopped_by_request:
        why = _halt_reason(desired)
        if process is not None:
            return _stop(process, memory, spec, now, Intent.STOPPING, why)
        return Plan(Intent.HALTED, memory, _clean_if_stale(observed), detail=why)

    too_large = larger_than_filesystem(spec, observed.storage)
    if too_large:
        return Plan(Intent.REFUSED, memory, reason="DiskTooLarge", detail=too_large)
    if process is None:
        refused = _not_admitted(desired, spec, observed, memory, context)
        if refused is not None:
            return refused
    shrinking = shrinking_disks(spec, observed)
    if shrinking:
        return Plan(Intent.REFUSED, memory, reason="DiskShrinkRefused", detail=shrinking)
    waiting = _wait_for_images(spec, observed, memory, context, now)
    if waiting is not None:
        return waiting
    if process is None and observed.missing_images:
        # Checked before ports are taken: a VM that cannot boot holds none.
        detail = "not a file in the images dir (or a link out of it): " + ", ".join(observed.missing_images)
        return Plan(
            Intent.WAITING_FOR_IMAGES,
            memory,
            _hold_nothing(observed),
            requeue_after=IMAGE_RECHECK,
            detail=detail,
        )
    if process is None and observed.missing_firmware:
        detail = firmware.missing_firmware_detail(observed)
        return Plan(
            Intent.WAITING_FOR_IMAGES,
            memory,
            _hold_nothing(observed),
            requeue_after=IMAGE_RECHECK,
            detail=detail,
            reason="FirmwareNotFound",
        )
    prepare = (
        *_prepare(desired, spec, observed),
        *firmware.prepare_nvram(desired, spec, observed, context.disks_dir),
    )
    if prepare:
        return Plan(Intent.PREPARING, memory, prepare, again=True)
    seed = _seed(desired, spec, context)
    argv = _argv(desired, spec, observed, context, seed)
    digest = argv_digest(argv)
    if process is not None:
        restart_at = desired.restart_requested_at
        if restart_at is not None and process.started_at < restart_at:
            why = f"restart requested by {desired.override.requested_by if desired.override else '?'}"
            return _stop(process, memory, spec, now, Intent.RESTARTING, why)
        return _keep_running(desired, process, digest, memory, spec, observed, now, context)
    return _start(desired, spec, observed, memory, now, argv, seed)


def _look_after(observed: Observed, memory: Memory) -> Plan | None:
    """A live process nobody watches is attached, an exit nobody recorded is recorded: every
    decision after needs the attachment's QMP answer, or the exit record."""
    if observed.process is not None and not observed.process.watched:
        return Plan(Intent.ADOPTING, memory, (Attach(observed.process.pid),), again=True)
    if observed.unrecorded_exit_pid is not None:
        return Plan(Intent.ADOPTING, memory, (RecordExit(observed.unrecorded_exit_pid),), again=True)
    if adopt_tpm := firmware.adopt_tpm(observed):
        return Plan(Intent.ADOPTING, memory, adopt_tpm, again=True)
    return None


def _halt_reason(desired: Desired) -> str:
    if desired.stopped_by_request and desired.override is not None:
        return f"stopped by request of {desired.override.requested_by or 'an API client'}"
    return "runStrategy is Halted"


def _not_admitted(
    desired: Desired, spec: QemuVMSpec, observed: Observed, memory: Memory, context: LaunchContext
) -> Plan | None:
    """A start the quotas or the host's memory or disk space do not allow: wait, holding no port."""
    if not desired.admission.admitted:
        return Plan(
            Intent.QUOTA_EXCEEDED,
            memory,
            _hold_nothing(observed),
            requeue_after=ADMISSION_RECHECK,
            detail=desired.admission.message,
        )
    available = observed.host_memory_available_mib
    if available is not None and available - spec.memory < context.memory_reserve_mib:
        detail = (
            f"starting needs {spec.memory} MiB; the host has {available} MiB available and keeps "
            f"{context.memory_reserve_mib} MiB in reserve"
        )
        return Plan(
            Intent.HOST_MEMORY_LOW,
            memory,
            _hold_nothing(observed),
            requeue_after=ADMISSION_RECHECK,
            detail=detail,
        )
    short = storage_shortfall(spec, observed, context.storage_reserve_mib)
    if short:
        return Plan(
            Intent.INSUFFICIENT_STORAGE,
            memory,
            _hold_nothing(observed),
            requeue_after=ADMISSION_RECHECK,
            detail=short,
        )
    return None


def _tear_down(desired: Desired | None, observed: Observed, memory: Memory, now: datetime) -> Plan:
    """Deletion as a finalizer: stop, release ports, delete disks, remove the runtime dir, finalize."""
    if observed.process is not None:
        stop_timeout = timedelta(seconds=desired.spec.stop_timeout) if desired and desired.spec else None
        return _stop_process(observed.process, memory, stop_timeout, now, Intent.DELETING, "deleting")
    actions: list[Action] = [*firmware.stray_tpm(observed)]
    if observed.ports:
        actions.append(ReleasePorts(tuple(sorted(observed.ports))))
    actions += [
        DeleteDisk(name, disk.path)
        for name, disk in sorted(observed.disks.items())
        if disk.reclaim_policy is ReclaimPolicy.DELETE
    ]
    if observed.has_runtime_dir:
        actions.append(RemoveRuntimeDir())
    if desired is None:
        return Plan(Intent.DELETING, memory, tuple(actions))
    if actions:
        # Finalize comes alone, in the next reconcile: what the teardown did is told first.
        return Plan(Intent.DELETING, memory, tuple(actions), again=True)
    return Plan(Intent.DELETING, memory, (Finalize(),))


def _wait_for_images(
    spec: QemuVMSpec, observed: Observed, memory: Memory, context: LaunchContext, now: datetime
) -> Plan | None:
    """Fetch the base images that new disks need, and wait until they are in the cache.

    A VM that runs keeps running meanwhile (a disk added to its spec waits for its image).
    """
    fetches: dict[RemoteImage, FetchImage] = {}
    waits: list[tuple[str, str, timedelta]] = []
    for disk in spec.disks:
        lookup = observed.bases.get(disk.name)
        if lookup is None or lookup.state is ImageState.READY:
            continue
        source = disk.source
        message = f"disk {disk.name!r}: {lookup.message}" if lookup.message else f"disk {disk.name!r}"
        if lookup.state is ImageState.MISSING and isinstance(source, RemoteImage):
            fetches[source] = FetchImage(source)
            waits.append(
                ("ImageDownloading", f"disk {disk.name!r}: downloading {source.url}", DOWNLOAD_RECHECK)
            )
        elif lookup.state is ImageState.FETCHING:
            waits.append((lookup.reason or "ImageDownloading", message, DOWNLOAD_RECHECK))
        elif lookup.state is ImageState.FAILED and lookup.retry_at is not None:
            waits.append((lookup.reason, message, max(lookup.retry_at - now, timedelta(0))))
        else:
            waits.append((lookup.reason or "ImageNotFound", message, IMAGE_RECHECK))
    if not waits:
        return None
    waits.sort(key=lambda wait: _IMAGE_REASON_ORDER.index(wait[0]) if wait[0] in _IMAGE_REASON_ORDER else 0)
    requeue = min(wait[2] for wait in waits)
    if observed.process is not None and context.liveness_period is not None:
        requeue = min(requeue, context.liveness_period)
    return Plan(
        Intent.WAITING_FOR_IMAGES,
        memory,
        tuple(fetches.values()),
        requeue_after=requeue,
        detail="; ".join(wait[1] for wait in waits),
        reason=waits[0][0],
    )


def _prepare(desired: Desired, spec: QemuVMSpec, observed: Observed) -> tuple[Action, ...]:
    """Ports and disks the spec needs and does not have yet (legal while running too)."""
    actions: list[Action] = []
    missing_ports = tuple(
        ((forward.protocol, forward.guest_port), forward.host_port)
        for forward in spec.network.forwards
        if (forward.protocol, forward.guest_port) not in observed.ports
    )
    if missing_ports:
        actions.append(AllocatePorts(missing_ports))
    for disk in spec.disks:
        record = observed.disks.get(disk.name)
        if record is not None and record.exists:
            continue
        lookup = observed.bases.get(disk.name)
        base = lookup.path if lookup is not None else None
        if disk.source is not None and base is None:
            continue  # _wait_for_images holds the VM until the base is at hand
        actions.append(CreateDisk(disk, base, desired.project, desired.name))
    return tuple(actions)


def _seed(desired: Desired, spec: QemuVMSpec, context: LaunchContext) -> WriteSeed | None:
    """The cloud-init seed to attach; its file name carries its content's digest, so a change
    of the cloud-init config changes argv and restarts the VM."""
    if spec.cloud_init is None:
        return None
    files = seed_files(spec.cloud_init, uid=desired.uid, name=desired.name)
    return WriteSeed(context.seed_path(seed_digest(files)), tuple(sorted(files.items())))


def _argv(
    desired: Desired, spec: QemuVMSpec, observed: Observed, context: LaunchContext, seed: WriteSeed | None
) -> tuple[str, ...]:
    machine_options, platform = firmware.launch_pieces(spec, observed, context.disks_dir)
    inputs = LaunchInputs(
        uid=desired.uid,
        name=desired.name,
        accel=context.accel,
        runtime=context.runtime,
        images_dir=context.images_dir,
        disk_paths={
            disk.name: record.path
            if (record := observed.disks.get(disk.name))
            else context.disk_path(disk.name)
            for disk in spec.disks
        },
        host_ports=dict(observed.ports),
        forward_address=context.forward_address,
        seed_path=seed.path if seed is not None else None,
        machine_options=machine_options,
        platform=platform,
    )
    return build_argv(spec, inputs)


def _keep_running(
    desired: Desired,
    process: ProcessObservation,
    digest: str,
    memory: Memory,
    spec: QemuVMSpec,
    observed: Observed,
    now: datetime,
    context: LaunchContext,
) -> Plan:
    if process.argv_digest != digest:
        return _stop(process, memory, spec, now, Intent.RESTARTING, "the spec changed and needs a restart")
    growing = [
        disk for disk, _ in growing_disks(spec, observed) if observed.disks[disk.name].size_mib is not None
    ]
    if growing:
        short = storage_shortfall(spec, observed, context.storage_reserve_mib)
        if short:
            # Stopping to grow would leave the VM down until room frees: it runs on meanwhile.
            return Plan(Intent.INSUFFICIENT_STORAGE, memory, requeue_after=ADMISSION_RECHECK, detail=short)
        sizes = ", ".join(f"{disk.name!r} to {disk.size} MiB" for disk in growing)
        return _stop(process, memory, spec, now, Intent.RESTARTING, f"growing disk {sizes} needs a restart")
    if process.qmp is QmpState.UNREACHABLE:
        if now - process.started_at < QMP_STARTUP_GRACE:
            return Plan(Intent.STARTING, memory, requeue_after=timedelta(milliseconds=200))
        return _kill(process, memory, Intent.RESTARTING, "QEMU does not answer QMP: killing it")
    if process.qmp is QmpState.PANICKED:
        return _kill(process, memory, Intent.RESTARTING, "guest panicked")
    if not process.runtime_intact and now - process.started_at >= QMP_STARTUP_GRACE:
        # QEMU creates its socket at start; one removed later cannot come back.
        return _kill(process, memory, Intent.RESTARTING, "its runtime dir or QMP socket was removed")
    lost_tpm = firmware.lost_tpm(spec, observed)
    if lost_tpm and process.qmp in (QmpState.RUNNING, QmpState.PAUSED):
        return _stop(process, memory, spec, now, Intent.RESTARTING, lost_tpm)
    step = run_state_step(desired, spec, process, memory, now=now)
    if step is not None:
        requeue = None if step.again else context.liveness_period
        return Plan(
            Intent(step.intent),
            step.memory,
            step.actions,
            requeue_after=requeue,
            again=step.again,
            detail=step.detail,
            reason=step.reason,
        )
    if memory.stop_requested_at is not None or memory.paused_since is not None:
        # A stop that is no longer wanted (e.g. Halted was reverted): let the guest run on.
        memory = replace(memory, stop_requested_at=None, paused_since=None)
    # A timed look: asking QMP is what finds a hung QEMU (SIGSTOP, a wedged main loop).
    return Plan(Intent.RUNNING, memory, requeue_after=context.liveness_period)


def _start(
    desired: Desired,
    spec: QemuVMSpec,
    observed: Observed,
    memory: Memory,
    now: datetime,
    argv: tuple[str, ...],
    seed: WriteSeed | None,
) -> Plan:
    """Start QEMU with `argv` (and `seed`, computed once by `plan`), unless the last exit, a
    backoff or a missing boot file says to wait."""
    # Stale runtime files are left for Spawn to clear: until then the exit record they hold is
    # what tells this plan (and the next) that a restart is a restart.
    last_exit = memory.last_exit
    restart_at = desired.restart_requested_at
    # A restart requested after the last exit starts the VM now: after a guest poweroff under
    # RerunOnFailure, and without waiting out a crash-loop backoff.
    kicked = restart_at is not None and last_exit is not None and restart_at > last_exit.at
    if last_exit is not None and not kicked and not should_restart(last_exit.reason, spec.run_strategy):
        detail = f"{last_exit.reason.value}; runStrategy {spec.run_strategy.value}"
        return Plan(Intent.FINISHED, memory, _clean_if_stale(observed), detail=detail)
    if not kicked and memory.next_retry_at is not None and now < memory.next_retry_at:
        wait = memory.next_retry_at - now
        detail = f"next start in {wait.total_seconds():.1f} s"
        if last_exit is not None:
            detail += f" after {last_exit.reason.value}" + (
                f": {last_exit.message}" if last_exit.message else ""
            )
        return Plan(Intent.BACKING_OFF, memory, requeue_after=wait, detail=detail)
    memory = replace(memory, next_retry_at=None)
    grow = [GrowDisk(disk.name, path, disk.size) for disk, path in growing_disks(spec, observed) if disk.size]
    actions = (
        *_release_unused(spec, observed),
        *grow,
        *((seed,) if seed is not None else ()),
        *firmware.tpm_before_spawn(spec, observed),
        Spawn(argv, argv_digest(argv)),
    )
    return Plan(Intent.STARTING, memory, actions, again=True)


def _release_unused(spec: QemuVMSpec, observed: Observed) -> tuple[Action, ...]:
    """Ports and disks the spec no longer names (only while no process runs)."""
    wanted_ports: set[PortKey] = {(forward.protocol, forward.guest_port) for forward in spec.network.forwards}
    unused_ports = tuple(sorted(key for key in observed.ports if key not in wanted_ports))
    actions: list[Action] = [ReleasePorts(unused_ports)] if unused_ports else []
    wanted_disks = {disk.name for disk in spec.disks} | firmware.nvram_held(spec)
    actions += [
        DeleteDisk(name, record.path)
        for name, record in sorted(observed.disks.items())
        if name not in wanted_disks and record.reclaim_policy is ReclaimPolicy.DELETE
    ]
    return tuple(actions)


def _clean_if_stale(observed: Observed) -> tuple[Action, ...]:
    return (*firmware.stray_tpm(observed), *((CleanRuntime(),) if observed.has_stale_runtime else ()))


def _hold_nothing(observed: Observed) -> tuple[Action, ...]:
    """For a VM that may not start: give back its host ports (while no process uses them)."""
    if observed.process is not None or not observed.ports:
        return _clean_if_stale(observed)
    return (*_clean_if_stale(observed), ReleasePorts(tuple(sorted(observed.ports))))


def _stop(
    process: ProcessObservation, memory: Memory, spec: QemuVMSpec, now: datetime, intent: Intent, why: str
) -> Plan:
    return _stop_process(process, memory, timedelta(seconds=spec.stop_timeout), now, intent, why)


def _stop_process(
    process: ProcessObservation,
    memory: Memory,
    stop_timeout: timedelta | None,
    now: datetime,
    intent: Intent,
    why: str,
) -> Plan:
    """Graceful stop across reconciles: power button, then `quit` after stopTimeout, then SIGKILL.

    The start of the stop is remembered in status, so a controller restart mid-stop continues
    where it was instead of starting over. A process that does not answer QMP is killed at once.
    A guest that cannot answer the power button gets less than stopTimeout (`_answer_window`).
    """
    timeout = stop_timeout if stop_timeout is not None else timedelta(seconds=30)
    requested = memory.stop_requested_at
    if process.qmp is QmpState.UNREACHABLE and now - process.started_at >= QMP_STARTUP_GRACE:
        # No QMP: the power button cannot be pressed. A process asked to stop may just be
        # closing its socket on the way out, so it gets the quit grace; a hung one goes now.
        if requested is not None and now - requested < QUIT_GRACE:
            return Plan(intent, memory, requeue_after=QUIT_GRACE - (now - requested), detail=why)
        return _kill(process, memory, intent, why)
    window, no_answer = _answer_window(process, timeout, now)
    if no_answer:
        why = f"{why}; {no_answer}"
    if requested is None:
        memory = replace(memory, stop_requested_at=now)
        if not window:
            return Plan(intent, memory, (Quit(),), requeue_after=QUIT_GRACE, detail=why)
        return Plan(intent, memory, (RequestPowerdown(),), requeue_after=window, detail=why)
    elapsed = now - requested
    if elapsed < window:
        return Plan(intent, memory, requeue_after=window - elapsed, detail=why)
    if elapsed < window + QUIT_GRACE:
        if process.qmp is QmpState.SHUTDOWN:
            # It announced its shutdown (the power button worked, or the quit of an earlier
            # pass is under way): it is on its way out and gets the grace, not another quit.
            return Plan(intent, memory, requeue_after=window + QUIT_GRACE - elapsed, detail=why)
        return Plan(intent, memory, (Quit(),), requeue_after=window + QUIT_GRACE - elapsed, detail=why)
    return _kill(process, memory, intent, why)


def _answer_window(process: ProcessObservation, timeout: timedelta, now: datetime) -> tuple[timedelta, str]:
    """How long the guest gets to power off after the power button, and why it is short.

    A paused guest runs no code, so it cannot answer: `quit` at once. A guest that has not
    booted yet ignores the button: it gets BOOT_PROBE to answer anyway, then `quit`.
    """
    if process.qmp in (QmpState.PAUSED, QmpState.PRELAUNCH):
        return timedelta(0), "the guest is paused and cannot answer the power button: quit"
    booting = not process.guest_booted and now - process.started_at < BOOT_ASSUMED_AFTER
    if booting and timeout > BOOT_PROBE:
        probe = BOOT_PROBE.total_seconds()
        return (
            BOOT_PROBE,
            f"the guest has not booted (no network card up): quit unless it powers off within {probe:g} s",
        )
    return timeout, ""


def _kill(process: ProcessObservation, memory: Memory, intent: Intent, why: str) -> Plan:
    """SIGKILL, then look again shortly: the pidfd records the exit when it comes."""
    return Plan(intent, memory, (Kill(process.pid),), requeue_after=STOP_RECHECK, detail=why)
