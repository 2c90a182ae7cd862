"""plan(desired, observed, memory, context, now) -> Plan: what to do next for one VM. Pure.

Shape (KubeVirt virt-handler's): first the intents are computed from (spec, observed process),
then one ordered decision picks the actions. A plan never assumes its actions succeed beyond
the memory it returns; `again` asks for the next reconcile at once (requeue 0), so each step
(ports and disks, then spawn, then continue) is decided from a fresh observation.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from api.images import RemoteImage
from api.types import QemuVMSpec, ReclaimPolicy, RunStrategy
from controller import firmware, network
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
    KillLost,
    RecordExit,
    ReleasePorts,
    RemoveRuntimeDir,
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
from controller.pausing import resumes_at_spawn, run_state_step
from controller.plan_types import Intent as Intent
from controller.plan_types import LaunchContext as LaunchContext
from controller.plan_types import Plan as Plan
from controller.qemu.argv import LaunchInputs, argv_digest, build_argv
from controller.stop_ladder import QMP_STARTUP_GRACE as QMP_STARTUP_GRACE
from controller.stop_ladder import QUIT_GRACE as QUIT_GRACE
from controller.stop_ladder import kill, stop, stop_process

IMAGE_RECHECK = timedelta(seconds=30)
# A download in progress wakes its VMs when it ends; this is only the safety net.
DOWNLOAD_RECHECK = timedelta(seconds=30)
# Which reason a VM waiting on several images shows: the one the user must act on first.
_IMAGE_REASON_ORDER = ("ImageChecksumMismatch", "ImageDownloadFailed", "ImageNotFound", "ImageDownloading")
# A VM waiting for room is looked at again this often (another VM's deletion does not wake it).
ADMISSION_RECHECK = timedelta(seconds=5)
EXIT_RECHECK = timedelta(milliseconds=50)


def plan(
    desired: Desired | None, observed: Observed, memory: Memory, context: LaunchContext, *, now: datetime
) -> Plan:
    """Decide the next actions for one VM. `desired` is None for an orphan (no object)."""
    memory = absorb_exit(memory, observed, desired)
    first = _bookkeeping(observed, memory)
    if first is not None:
        return first
    if desired is None or desired.deleting:
        return _tear_down(desired, observed, memory, now)
    if desired.spec is None:
        # Keep whatever runs: an invalid edit must not take a working VM down.
        return Plan(Intent.INVALID, memory)
    spec = desired.spec
    process = observed.process
    held = _held(desired, spec, observed, memory, context, now) or _blocked(
        desired, spec, observed, memory, context, now
    )
    if held is not None:
        return held
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
            return stop(process, memory, spec, now, Intent.RESTARTING, why)
        return _keep_running(desired, process, digest, memory, spec, observed, now, context)
    helpers = (
        *firmware.tpm_before_spawn(spec, observed),
        *network.passt_before_spawn(spec, observed, context.forward_address),
    )
    return _start(desired, spec, observed, memory, now, argv, (seed, helpers))


def _bookkeeping(observed: Observed, memory: Memory) -> Plan | None:
    """Before any decision: an exit under way, a process or an exit nobody recorded, a lost QEMU."""
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
    return None


def _held(
    desired: Desired,
    spec: QemuVMSpec,
    observed: Observed,
    memory: Memory,
    context: LaunchContext,
    now: datetime,
) -> Plan | None:
    """A VM this host will not run (an invalid spec here), or one held down: a shutdown, a halt."""
    process = observed.process
    if desired.admission.invalid_spec:
        # Valid for the API, not for this host (a hostPort outside its port range): the same.
        return Plan(Intent.INVALID, memory, _hold_nothing(observed), detail=desired.admission.message)
    if context.shutting_down:
        if process is not None:
            return stop(process, memory, spec, now, Intent.SHUTTING_DOWN, "tofu-qemu is shutting down")
        return Plan(Intent.SHUTTING_DOWN, memory, detail="tofu-qemu is shutting down")
    if spec.run_strategy is RunStrategy.HALTED or desired.stopped_by_request:
        why = _halt_reason(desired)
        if process is not None:
            return stop(process, memory, spec, now, Intent.STOPPING, why)
        return Plan(Intent.HALTED, memory, _clean_if_stale(observed), detail=why)
    return None


def _blocked(
    desired: Desired,
    spec: QemuVMSpec,
    observed: Observed,
    memory: Memory,
    context: LaunchContext,
    now: datetime,
) -> Plan | None:
    """What keeps a wanted VM from going on: too little room, admission, a disk shrink, images
    or firmware that are not there. None: nothing does."""
    process = observed.process
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
    if waiting is not None or process is not None:
        return waiting
    if observed.missing_images:
        # Checked before ports are taken: a VM that cannot boot holds none.
        detail = "not a file in the images dir (or a link out of it): " + ", ".join(observed.missing_images)
        return Plan(
            Intent.WAITING_FOR_IMAGES,
            memory,
            _hold_nothing(observed),
            requeue_after=IMAGE_RECHECK,
            detail=detail,
        )
    if observed.missing_firmware:
        detail = firmware.missing_firmware_detail(observed)
        return Plan(
            Intent.WAITING_FOR_IMAGES,
            memory,
            _hold_nothing(observed),
            requeue_after=IMAGE_RECHECK,
            detail=detail,
            reason="FirmwareNotFound",
        )
    return None


def _look_after(observed: Observed, memory: Memory) -> Plan | None:
    """A live process nobody watches is attached, an exit nobody recorded is recorded: every
    decision after needs the attachment's QMP answer, or the exit record."""
    if observed.process is not None and not observed.process.watched:
        return Plan(Intent.ADOPTING, memory, (Attach(observed.process.pid),), again=True)
    if observed.unrecorded_exit_pid is not None:
        return Plan(Intent.ADOPTING, memory, (RecordExit(observed.unrecorded_exit_pid),), again=True)
    if adopt_helpers := firmware.adopt_tpm(observed) + network.adopt_passt(observed):
        return Plan(Intent.ADOPTING, memory, adopt_helpers, again=True)
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
        return stop_process(observed.process, memory, stop_timeout, now, Intent.DELETING, "deleting")
    actions: list[Action] = [*firmware.stray_tpm(observed), *network.stray_passt(observed)]
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
        return stop(process, memory, spec, now, Intent.RESTARTING, "the spec changed and needs a restart")
    growing = [
        disk for disk, _ in growing_disks(spec, observed) if observed.disks[disk.name].size_mib is not None
    ]
    if growing:
        short = storage_shortfall(spec, observed, context.storage_reserve_mib)
        if short:
            # Stopping to grow would leave the VM down until room frees: it runs on meanwhile.
            return Plan(Intent.INSUFFICIENT_STORAGE, memory, requeue_after=ADMISSION_RECHECK, detail=short)
        sizes = ", ".join(f"{disk.name!r} to {disk.size} MiB" for disk in growing)
        return stop(process, memory, spec, now, Intent.RESTARTING, f"growing disk {sizes} needs a restart")
    if process.qmp is QmpState.UNREACHABLE:
        if now - process.started_at < QMP_STARTUP_GRACE:
            return Plan(Intent.STARTING, memory, requeue_after=timedelta(milliseconds=200))
        return kill(process, memory, Intent.RESTARTING, "QEMU does not answer QMP: killing it")
    if process.qmp is QmpState.PANICKED:
        return kill(process, memory, Intent.RESTARTING, "guest panicked")
    if not process.runtime_intact and now - process.started_at >= QMP_STARTUP_GRACE:
        # QEMU creates its socket at start; one removed later cannot come back.
        return kill(process, memory, Intent.RESTARTING, "its runtime dir or QMP socket was removed")
    lost_helper = firmware.lost_tpm(spec, observed) or network.lost_passt(spec, observed)
    if lost_helper and process.qmp in (QmpState.RUNNING, QmpState.PAUSED):
        return stop(process, memory, spec, now, Intent.RESTARTING, lost_helper)
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
    before: tuple[WriteSeed | None, tuple[Action, ...]],
) -> Plan:
    """Start QEMU with `argv` (after `before`: the seed and the helper processes, computed once by
    `plan`), unless the last exit, a backoff or a missing boot file says to wait."""
    seed, helpers = before
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
        *helpers,
        Spawn(argv, argv_digest(argv), resume=resumes_at_spawn(spec)),
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
    return (
        *firmware.stray_tpm(observed),
        *network.stray_passt(observed),
        *((CleanRuntime(),) if observed.has_stale_runtime else ()),
    )


def _hold_nothing(observed: Observed) -> tuple[Action, ...]:
    """For a VM that may not start: give back its host ports (while no process uses them)."""
    if observed.process is not None or not observed.ports:
        return _clean_if_stale(observed)
    return (*_clean_if_stale(observed), ReleasePorts(tuple(sorted(observed.ports))))
