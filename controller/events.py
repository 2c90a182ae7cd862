"""events_for(...) -> the events one step of a reconcile caused. Pure.

Derived from what the reconciler already has, never from what triggered it: the status before
and after, the actions that ran, and the error. So a reconcile that changes nothing records
nothing, a requeue that finds the same wait or the same error records nothing again, and a
controller restart (status is stored) does not repeat what was already told.

`before` is the status last stored: what a pass that stored nothing changed (it handed over to
the next pass at once) is told by the next pass that stores, from the same diff.

Order within one step: admission and newly held ports, the actions in the order they ran, then
what they led to (an exit, a restart, a phase), then the error. The reconciler splits a
reconcile in two steps at the status it stores before spawning, so an exit noticed before a
restart comes before `Started`, and an exit of the process it just started comes after.

`Deleted` is not derived here: the store records it in the transaction that removes the object
(api/store/status_writer.py finalize), so it exists exactly when the removal does.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass

from api.types import Condition, ConditionStatus, ExitReason, LastExit, Phase, QemuVMStatus, ReclaimPolicy
from controller.actions import (
    Action,
    CreateDisk,
    DeleteDisk,
    FetchImage,
    GrowDisk,
    Kill,
    KillLost,
    PrepareNvram,
    Quit,
    RequestGuestShutdown,
    RequestPowerdown,
    Spawn,
    Unpause,
)
from controller.model import Desired

# Exits the controller or the guest meant; the others are failures worth a Warning.
_CLEAN_EXITS = frozenset({ExitReason.GUEST_POWEROFF, ExitReason.STOPPED_BY_CONTROLLER})
_ADMISSION_WAITS = frozenset({"QuotaExceeded", "HostMemoryLow", "InsufficientStorage"})
# Ready reasons of a VM waiting on an image; all but a download in progress need the user.
_IMAGE_WAITS = frozenset(
    {"ImageNotFound", "ImageDownloading", "ImageChecksumMismatch", "ImageDownloadFailed"}
)
_ERROR_REASON = "ReconcileError"
# Synced reasons of a spec this host refuses (the VM keeps running if it runs).
_REFUSALS = frozenset({"DiskShrinkRefused", "DiskTooLarge"})


@dataclass(frozen=True, slots=True)
class VMEvent:
    """One event about the reconciled VM; the reconciler adds who, when and the trace."""

    reason: str
    message: str
    warning: bool = False


def events_for(
    desired: Desired,
    before: QemuVMStatus,
    after: QemuVMStatus,
    executed: Sequence[Action],
    error: str | None,
) -> list[VMEvent]:
    """The events of one reconcile step that took `before` to `after` by running `executed`
    (the actions that succeeded, in order) and ended with `error` (None: no error)."""
    events = [*_admission(desired, before, after), *_ports(desired, before, after)]
    events += [event for action in executed if (event := _action_event(action, after)) is not None]
    events += _exit(before.last_exit, after.last_exit)
    if after.restarts > before.restarts:
        events.append(VMEvent("Restarted", _restart_message(after)))
    events += _phase(before, after, _unpaused_message(desired, executed))
    events += _waits(before, after, executed)
    if error is not None and not _same_error(before, error):
        events.append(VMEvent(_ERROR_REASON, error, warning=True))
    return events


def _may_run(desired: Desired) -> bool:
    """Only a VM that may run is admitted or given ports (a deleting one only releases)."""
    return desired.spec is not None and not desired.deleting and not desired.admission.invalid_spec


def _admission(desired: Desired, before: QemuVMStatus, after: QemuVMStatus) -> list[VMEvent]:
    if not _may_run(desired):
        return []
    old, new = _condition(before, "Admitted"), _condition(after, "Admitted")
    if new is None or new.status is not ConditionStatus.TRUE:
        return []
    if old is not None and old.status is ConditionStatus.TRUE:
        return []
    waited = f" after {old.reason}" if old is not None else ""
    return [VMEvent("Scheduled", f"admitted to run on this host{waited}")]


def _action_event(action: Action, after: QemuVMStatus) -> VMEvent | None:
    """The event of an action worth telling; bookkeeping (clean-ups, cont) has none."""
    match action:
        case FetchImage(source=source):
            return VMEvent("ImageFetching", f"downloading {source.url}")
        case CreateDisk(disk=disk, base=base):
            made = f"an overlay on {base.name}" if base is not None else "a blank disk"
            if disk.reclaim_policy is ReclaimPolicy.RETAIN:
                # The executor adopts a retained disk of this VM name when there is one.
                made = f"the retained disk of this name, or else {made}"
            size = f", {disk.size} MiB" if disk.size is not None else ""
            return VMEvent("DiskCreated", f"disk {disk.name!r}: {made}{size}")
        case PrepareNvram(name=name, template=template, reclaim_policy=policy):
            made = f"a copy of {template.name}"
            if policy is ReclaimPolicy.RETAIN:
                made = f"the retained NVRAM of this VM name, or else {made}"
            return VMEvent("DiskCreated", f"NVRAM {name!r}: {made}")
        case GrowDisk(name=name, size_mib=size_mib):
            return VMEvent("DiskGrown", f"disk {name!r} grown to {size_mib} MiB")
        case DeleteDisk(name=name):
            return VMEvent("DiskDeleted", f"disk {name!r} deleted")
        case Spawn():
            started = f" (pid {after.pid}, accel {after.accel.value})" if after.pid and after.accel else ""
            return VMEvent("Started", f"QEMU started{started}")
        case RequestPowerdown():
            return VMEvent("Stopping", f"power button pressed: {_ready_message(after) or 'stopping'}")
        case RequestGuestShutdown():
            return VMEvent(
                "Stopping", f"guest-shutdown sent to the guest agent: {_ready_message(after) or 'stopping'}"
            )
        case Quit():
            return VMEvent("Stopping", f"QEMU told to quit: {_ready_message(after) or 'stopping'}")
        case Kill(pid=pid, signal=number):
            why = _ready_message(after)
            return VMEvent(
                "Killing", f"{_signal_name(number)} sent to pid {pid}" + (f": {why}" if why else "")
            )
        case KillLost(pid=pid):
            return VMEvent("Killing", f"SIGKILL sent to pid {pid}: it lost its runtime dir", warning=True)
        case _:
            return None


def _ports(desired: Desired, before: QemuVMStatus, after: QemuVMStatus) -> list[VMEvent]:
    """Forwards the ledger holds now and the stored status did not show. Told from this diff,
    not from the AllocatePorts action: the pass that allocates hands over to the next at once
    without storing anything (controller/reconciler.py `_hands_over`), and the pass that stores
    the ports tells them."""
    new = [port for port in after.ports if port not in before.ports]
    if not new or not _may_run(desired):
        return []
    listed = ", ".join(f"{p.protocol.value}/{p.guest_port} -> {p.host_port}" for p in new)
    return [VMEvent("PortsAllocated", f"host ports {listed}")]


def tells_of(executed: Sequence[Action]) -> bool:
    """Whether an event is told from one of the `executed` actions themselves (or worded by
    one: who unpaused), which a later pass cannot derive again from a status diff: a pass that
    ran one must store its events."""
    return any(isinstance(action, Unpause) or _action_event(action, QemuVMStatus()) for action in executed)


def _exit(before: LastExit | None, after: LastExit | None) -> list[VMEvent]:
    if after is None or (before is not None and before.at >= after.at):
        return []
    how = [f"exit code {after.exit_code}"] if after.exit_code is not None else []
    if after.signal is not None:
        how.append(_signal_name(after.signal))
    message = after.reason.value + (f" ({', '.join(how)})" if how else "")
    if after.message:
        message += f": {after.message}"
    return [VMEvent("ExitDetected", message, warning=after.reason not in _CLEAN_EXITS)]


def _restart_message(after: QemuVMStatus) -> str:
    cause = f" after {after.last_exit.reason.value}" if after.last_exit is not None else ""
    return f"restart {after.restarts}{cause}"


def _unpaused_message(desired: Desired, executed: Sequence[Action]) -> str:
    if any(isinstance(action, Unpause) for action in executed) and desired.override is not None:
        return f"unpaused at the request of {desired.override.requested_by or 'an API client'}"
    return "running again (continued from outside tofu-qemu)"


def _phase(before: QemuVMStatus, after: QemuVMStatus, unpaused: str) -> list[VMEvent]:
    if after.phase is before.phase:
        return []
    if after.phase is Phase.CRASH_LOOP_BACK_OFF:
        retry = f"; next start at {after.next_retry_at.isoformat()}" if after.next_retry_at else ""
        return [VMEvent("BackOff", f"{after.failures} consecutive failures{retry}", warning=True)]
    if after.phase is Phase.STOPPED:
        why = _ready_message(after)
        return [VMEvent("Stopped", f"stopped: {why}" if why else "stopped")]
    if after.phase is Phase.PAUSED:
        return [VMEvent("Paused", _ready_message(after) or "paused")]
    if before.phase is Phase.PAUSED and after.phase is Phase.RUNNING:
        return [VMEvent("Unpaused", unpaused)]
    return []


def _waits(before: QemuVMStatus, after: QemuVMStatus, executed: Sequence[Action]) -> list[VMEvent]:
    """A wait the VM entered: told once, when its condition's reason becomes the waiting one."""
    events = []
    admitted_old, admitted = _condition(before, "Admitted"), _condition(after, "Admitted")
    if (
        admitted is not None
        and admitted.reason in _ADMISSION_WAITS
        and not _same_reason(admitted_old, admitted)
    ):
        events.append(VMEvent(admitted.reason, admitted.message, warning=True))
    ready_old, ready = _condition(before, "Ready"), _condition(after, "Ready")
    fetching = any(isinstance(action, FetchImage) for action in executed)
    if (
        ready is not None
        and ready.reason in _IMAGE_WAITS
        and not _same_reason(ready_old, ready)
        and not fetching
    ):
        waiting = ready.reason != "ImageDownloading"
        events.append(VMEvent("WaitingForImage", f"{ready.reason}: {ready.message}", warning=waiting))
    synced_old, synced = _condition(before, "Synced"), _condition(after, "Synced")
    if synced is not None and synced.reason in _REFUSALS and not _same_reason(synced_old, synced):
        events.append(VMEvent(synced.reason, synced.message, warning=True))
    return events


def _same_error(before: QemuVMStatus, error: str) -> bool:
    """The same error as the last reconcile reported: a retry loop tells it once."""
    ready = _condition(before, "Ready")
    return ready is not None and ready.reason == _ERROR_REASON and ready.message == error


def _same_reason(old: Condition | None, new: Condition) -> bool:
    return old is not None and old.reason == new.reason


def _condition(status: QemuVMStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def _ready_message(status: QemuVMStatus) -> str:
    ready = _condition(status, "Ready")
    return ready.message if ready is not None else ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
