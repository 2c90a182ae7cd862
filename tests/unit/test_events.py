"""events_for: which events one reconcile step records, derived from statuses and actions. No mocks."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import PurePath

import pytest

from api.images import RemoteImage
from api.types import (
    Accel,
    AllocatedPort,
    Condition,
    ConditionStatus,
    DiskSpec,
    ExitReason,
    LastExit,
    Phase,
    Protocol,
    QemuVMStatus,
    ReclaimPolicy,
)
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
    Quit,
    ReleasePorts,
    RemoveRuntimeDir,
    RequestGuestShutdown,
    RequestPowerdown,
    Spawn,
    Unpause,
)
from controller.admission import INVALID_SPEC, Admission
from controller.events import VMEvent, events_for, tells_of
from tests.unit.test_plan import HTTP, NOW, desired

VM = desired()


def cond(type_: str, ok: bool, reason: str, message: str = "") -> Condition:
    status = ConditionStatus.TRUE if ok else ConditionStatus.FALSE
    return Condition(type=type_, status=status, reason=reason, message=message, last_transition_time=NOW)


ADMITTED = cond("Admitted", True, "Admitted")
RUNNING = QemuVMStatus(
    phase=Phase.RUNNING,
    conditions=(ADMITTED, cond("Ready", True, "Running")),
    pid=4242,
    accel=Accel.TCG,
    ports=(AllocatedPort(protocol=Protocol.TCP, guest_port=80, host_port=20000),),
)
STARTING = RUNNING.model_copy(update={"phase": Phase.STARTING})


def exited(reason: ExitReason, **fields: object) -> LastExit:
    return LastExit.model_validate({"reason": reason, "at": NOW, **fields})


def step(
    before: QemuVMStatus,
    after: QemuVMStatus,
    executed: Sequence[Action] = (),
    error: str | None = None,
) -> list[tuple[str, str, bool]]:
    return [(e.reason, e.message, e.warning) for e in events_for(VM, before, after, executed, error)]


def reasons(events: list[tuple[str, str, bool]]) -> list[str]:
    return [reason for reason, _, _ in events]


def test_a_steady_reconcile_records_nothing() -> None:
    """Running before and after, nothing executed: no event (a liveness requeue is silent)."""
    assert step(RUNNING, RUNNING) == []


def test_a_first_start_is_scheduled_ports_allocated_started_in_order() -> None:
    """The first reconcile of a new VM tells admission, each action, then nothing else."""
    actions = (AllocatePorts(((HTTP, None),)), Spawn(("qemu",), "d"), Continue())
    assert step(QemuVMStatus(), STARTING, actions) == [
        ("Scheduled", "admitted to run on this host", False),
        ("PortsAllocated", "host ports tcp/80 -> 20000", False),
        ("Started", "QEMU started (pid 4242, accel tcg)", False),
    ]


@pytest.mark.parametrize(
    ("action", "reason", "message"),
    [
        pytest.param(
            FetchImage(RemoteImage("https://example.org/a.img", None)),
            "ImageFetching",
            "downloading https://example.org/a.img",
            id="fetch",
        ),
        pytest.param(
            CreateDisk(DiskSpec(name="root", size=2048), PurePath("/i/base.raw"), "lab", "web"),
            "DiskCreated",
            "disk 'root': an overlay on base.raw, 2048 MiB",
            id="disk-created",
        ),
        pytest.param(
            CreateDisk(
                DiskSpec.model_validate({"name": "data", "size": 512, "reclaimPolicy": ReclaimPolicy.RETAIN}),
                None,
                "lab",
                "web",
            ),
            "DiskCreated",
            "disk 'data': the retained disk of this name, or else a blank disk, 512 MiB",
            id="disk-retained-or-blank",
        ),
        pytest.param(
            GrowDisk("root", PurePath("/d/root.qcow2"), 4096), "DiskGrown", "disk 'root' grown to 4096 MiB"
        ),
        pytest.param(DeleteDisk("root", PurePath("/d/root.qcow2")), "DiskDeleted", "disk 'root' deleted"),
        pytest.param(Kill(4242), "Killing", "SIGKILL sent to pid 4242", id="kill"),
        pytest.param(RequestPowerdown(), "Stopping", "power button pressed: stopping", id="powerdown"),
        pytest.param(
            RequestGuestShutdown(), "Stopping", "guest-shutdown sent to the guest agent: stopping", id="agent"
        ),
        pytest.param(Quit(), "Stopping", "QEMU told to quit: stopping", id="quit"),
    ],
)
def test_each_told_action_has_its_event(action: Action, reason: str, message: str) -> None:
    """An action worth telling records one event with its reason and a message naming what."""
    assert step(RUNNING, RUNNING, (action,)) == [(reason, message, False)]


def test_bookkeeping_actions_record_nothing() -> None:
    """cont, clean-ups and port releases are not events."""
    actions = (Continue(), CleanRuntime(), ReleasePorts((HTTP,)), RemoveRuntimeDir())
    assert step(RUNNING, RUNNING, actions) == []


@pytest.mark.parametrize(
    ("last_exit", "message", "warning"),
    [
        pytest.param(exited(ExitReason.GUEST_POWEROFF, exit_code=0), "guest-poweroff (exit code 0)", False),
        pytest.param(exited(ExitReason.STOPPED_BY_CONTROLLER), "stopped-by-controller", False),
        pytest.param(
            exited(ExitReason.KILLED, signal=signal.SIGKILL), "killed-by-signal (SIGKILL)", True, id="killed"
        ),
        pytest.param(
            exited(ExitReason.CRASHED, exit_code=1, message="could not load kernel"),
            "crashed (exit code 1): could not load kernel",
            True,
            id="crashed",
        ),
        pytest.param(exited(ExitReason.VANISHED), "vanished", True),
    ],
)
def test_exit_detected_is_a_warning_only_for_failures(
    last_exit: LastExit, message: str, warning: bool
) -> None:
    """A new lastExit is told once with its reason, code or signal and QEMU's message."""
    after = RUNNING.model_copy(update={"last_exit": last_exit, "pid": None})
    assert step(RUNNING, after) == [("ExitDetected", message, warning)]


def test_an_exit_already_told_is_not_told_again() -> None:
    """The same lastExit before and after (a later reconcile) records nothing."""
    status = RUNNING.model_copy(update={"last_exit": exited(ExitReason.KILLED, signal=9)})
    assert step(status, status) == []


def test_an_exit_then_a_restart() -> None:
    """The step before a respawn tells the exit, then the restart with its cause."""
    before = RUNNING.model_copy(update={"restarts": 1})
    after = RUNNING.model_copy(
        update={
            "restarts": 2,
            "last_exit": exited(ExitReason.KILLED, signal=9, at=NOW + timedelta(seconds=1)),
        }
    )
    assert reasons(step(before, after)) == ["ExitDetected", "Restarted"]
    assert step(before, after)[1] == ("Restarted", "restart 2 after killed-by-signal", False)


def test_an_exit_of_the_process_just_started_comes_after_started() -> None:
    """Within one step, actions come first: a process that died at once exits after it started."""
    after = QemuVMStatus(conditions=(ADMITTED,), last_exit=exited(ExitReason.CRASHED, exit_code=1))
    assert reasons(step(QemuVMStatus(conditions=(ADMITTED,)), after, (Spawn(("qemu",), "d"),))) == [
        "Started",
        "ExitDetected",
    ]


def test_backoff_is_a_warning_with_the_next_retry() -> None:
    """Becoming CrashLoopBackOff is told with the failure count and next start time."""
    retry = NOW + timedelta(seconds=2)
    after = QemuVMStatus(
        phase=Phase.CRASH_LOOP_BACK_OFF, conditions=(ADMITTED,), failures=3, next_retry_at=retry
    )
    assert step(STARTING.model_copy(update={"failures": 3}), after) == [
        ("BackOff", f"3 consecutive failures; next start at {retry.isoformat()}", True)
    ]


def test_stopped_names_why() -> None:
    """Becoming Stopped is told with the Ready condition's message."""
    after = QemuVMStatus(
        phase=Phase.STOPPED, conditions=(ADMITTED, cond("Ready", False, "Halted", "runStrategy is Halted"))
    )
    assert step(RUNNING, after) == [("Stopped", "stopped: runStrategy is Halted", False)]


def test_teardown_tells_the_disks_it_deleted_and_leaves_deleted_to_the_store() -> None:
    """Finalize itself records nothing here: the store records Deleted as it removes the object."""
    actions = (DeleteDisk("root", PurePath("/d/root.qcow2")), RemoveRuntimeDir(), Finalize())
    events = events_for(desired(deleting=True), RUNNING, RUNNING, actions, None)
    assert [e.reason for e in events] == ["DiskDeleted"]


def test_reconcile_error_is_told_once_per_distinct_message() -> None:
    """A retry that fails the same way records nothing; a different error is told."""
    failing = RUNNING.model_copy(
        update={"conditions": (ADMITTED, cond("Ready", False, "ReconcileError", "port busy"))}
    )
    assert step(RUNNING, failing, error="port busy") == [("ReconcileError", "port busy", True)]
    assert step(failing, failing, error="port busy") == []
    assert step(failing, failing, error="disk full") == [("ReconcileError", "disk full", True)]


def test_quota_wait_is_told_once_and_admission_after_it() -> None:
    """QuotaExceeded when the Admitted reason becomes it; Scheduled once admitted after waiting."""
    waiting = QemuVMStatus(conditions=(cond("Admitted", False, "QuotaExceeded", "server max_vms: limit 1"),))
    assert step(QemuVMStatus(), waiting) == [("QuotaExceeded", "server max_vms: limit 1", True)]
    assert step(waiting, waiting) == []
    assert step(waiting, STARTING) == [
        ("Scheduled", "admitted to run on this host after QuotaExceeded", False),
        ("PortsAllocated", "host ports tcp/80 -> 20000", False),
    ]


def test_ports_allocated_is_told_from_the_ports_the_stored_status_lacked() -> None:
    """Whichever pass allocated them, the pass that stores them tells them; only new ones, and
    not for a VM that is being deleted."""
    assert step(QemuVMStatus(), STARTING) == [
        ("Scheduled", "admitted to run on this host", False),
        ("PortsAllocated", "host ports tcp/80 -> 20000", False),
    ]
    ssh = AllocatedPort(protocol=Protocol.TCP, guest_port=22, host_port=20001)
    more = RUNNING.model_copy(update={"ports": (*RUNNING.ports, ssh)})
    assert step(RUNNING, more) == [("PortsAllocated", "host ports tcp/22 -> 20001", False)]
    moved = RUNNING.model_copy(update={"ports": (ssh.model_copy(update={"host_port": 20002}),)})
    assert step(more, moved) == [("PortsAllocated", "host ports tcp/22 -> 20002", False)]
    assert step(more, RUNNING) == [], "a release is not told"
    assert step(RUNNING, RUNNING, (AllocatePorts(((HTTP, None),)),)) == [], "held already: nothing new"
    gone = [(e.reason, e.message) for e in events_for(replace(VM, deleting=True), RUNNING, more, (), None)]
    assert gone == []


@pytest.mark.parametrize(
    ("executed", "told"),
    [
        pytest.param((), False, id="nothing"),
        pytest.param((AllocatePorts(((HTTP, None),)), Continue()), False, id="ports-and-cont"),
        pytest.param((Spawn(("qemu",), "d"),), True, id="spawn"),
        pytest.param((Kill(4242),), True, id="kill"),
        pytest.param((DeleteDisk("root", PurePath("/d/root.qcow2")),), True, id="disk"),
        pytest.param((Unpause(),), True, id="unpause-names-who-asked"),
    ],
)
def test_tells_of_names_the_actions_a_later_pass_could_not_tell(
    executed: tuple[Action, ...], told: bool
) -> None:
    """A pass that ran one of these must store its events; ports and `cont` are told later."""
    assert tells_of(executed) is told


@pytest.mark.parametrize(
    ("reason", "warning"),
    [("ImageNotFound", True), ("ImageChecksumMismatch", True), ("ImageDownloading", False)],
)
def test_waiting_for_an_image_is_told_once(reason: str, warning: bool) -> None:
    """Ready becoming an image wait records WaitingForImage once, a Warning if the user must act."""
    waiting = QemuVMStatus(conditions=(ADMITTED, cond("Ready", False, reason, "disk 'root'")))
    assert step(QemuVMStatus(conditions=(ADMITTED,)), waiting) == [
        ("WaitingForImage", f"{reason}: disk 'root'", warning)
    ]
    assert step(waiting, waiting) == []


def test_a_download_started_is_not_also_a_wait() -> None:
    """FetchImage executed already says so: no WaitingForImage beside ImageFetching."""
    waiting = QemuVMStatus(conditions=(ADMITTED, cond("Ready", False, "ImageDownloading", "disk 'root'")))
    fetch = FetchImage(RemoteImage("https://example.org/a.img", "ab" * 32))
    assert reasons(step(QemuVMStatus(conditions=(ADMITTED,)), waiting, (fetch,))) == ["ImageFetching"]


def test_invalid_or_deleting_vms_are_not_scheduled() -> None:
    """Admitted=True of an invalid or deleting VM is no admission to run."""
    refused_port = replace(desired(), admission=Admission(False, "hostPort outside the range", INVALID_SPEC))
    for vm in (desired(invalid=True), desired(deleting=True), refused_port):
        assert events_for(vm, QemuVMStatus(), RUNNING, (), None) == []


def test_a_storage_wait_is_told_once() -> None:
    """InsufficientStorage is an admission wait like QuotaExceeded."""
    message = "its new disks need 16 MiB; the disks filesystem has 20 MiB free and keeps 16 MiB in reserve"
    waiting = QemuVMStatus(conditions=(cond("Admitted", False, "InsufficientStorage", message),))
    assert step(QemuVMStatus(), waiting) == [("InsufficientStorage", message, True)]
    assert step(waiting, waiting) == []


def test_a_disk_too_large_is_told_once() -> None:
    refused = QemuVMStatus(
        conditions=(ADMITTED, cond("Synced", False, "DiskTooLarge", "can never hold them"))
    )
    assert step(QemuVMStatus(conditions=(ADMITTED,)), refused) == [
        ("DiskTooLarge", "can never hold them", True)
    ]
    assert step(refused, refused) == []


def test_events_are_values() -> None:
    """VMEvent is plain data: the reconciler adds the VM, time and trace."""
    assert VMEvent("Started", "QEMU started") == VMEvent("Started", "QEMU started", warning=False)
