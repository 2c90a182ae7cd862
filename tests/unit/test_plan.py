"""plan(desired, observed, memory, context, now): one table row per situation, no mocks."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import PurePath
from typing import Any

import pytest

from api.types import Accel, ExitReason, LastExit, Protocol, QemuVMSpec, ReclaimPolicy
from controller.actions import (
    Action,
    AllocatePorts,
    CleanRuntime,
    Continue,
    CreateDisk,
    DeleteDisk,
    Finalize,
    Kill,
    KillLost,
    Quit,
    ReleasePorts,
    RemoveRuntimeDir,
    RequestPowerdown,
    Spawn,
)
from controller.model import (
    Desired,
    DiskRecord,
    ExitObservation,
    ImageLookup,
    ImageState,
    Memory,
    Observed,
    ProcessObservation,
    QmpState,
)
from controller.plan import Intent, LaunchContext, Plan, plan
from controller.qemu.argv import RuntimePaths, argv_digest

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
UID = "0b7d4a43-2c55-4a8e-9a57-3f0d7e6e2a10"
CONTEXT = LaunchContext(
    accel=Accel.TCG,
    runtime=RuntimePaths(PurePath("/data/run") / UID),
    images_dir=PurePath("/data/images"),
    disks_dir=PurePath("/data/disks") / UID,
)
HTTP = (Protocol.TCP, 80)
ROOT_PATH = PurePath("/data/disks") / UID / "root.qcow2"
ROOT_DISK = DiskRecord("root", ReclaimPolicy.DELETE, exists=True, path=ROOT_PATH, size_mib=1024)
BASE_READY = {"root": ImageLookup(ImageState.READY, path=PurePath("/data/images/base.raw"))}


def spec(**fields: Any) -> QemuVMSpec:
    raw: dict[str, Any] = {
        "memory": 256,
        "boot": {"kernel": "tiny-guest/vmlinuz"},
        "disks": [{"name": "root", "image": "base.raw"}],
        "network": {"forwards": [{"guestPort": 80}]},
        "stopTimeout": 30,
    }
    raw.update(fields)
    return QemuVMSpec.model_validate(raw)


def desired(*, deleting: bool = False, invalid: bool = False, **fields: Any) -> Desired:
    return Desired(
        uid=UID,
        project="lab",
        name="web",
        generation=1,
        spec=None if invalid else spec(**fields),
        spec_error="spec.memory: must be ≥ 16 MiB" if invalid else None,
        deleting=deleting,
    )


def ready(**overrides: Any) -> dict[str, Any]:
    """Observed fields of a VM whose ports and disks exist."""
    base: dict[str, Any] = {"ports": {HTTP: 20080}, "disks": {"root": ROOT_DISK}}
    base.update(overrides)
    return base


def digest_for(vm: Desired, ports: dict[Any, int] | None = None) -> str:
    probe = plan(vm, observed(**ready(ports=ports or {HTTP: 20080})), Memory(), CONTEXT, now=NOW)
    spawn = next(action for action in probe.actions if isinstance(action, Spawn))
    return spawn.digest


def process(digest: str, *, qmp: QmpState = QmpState.RUNNING, age: float = 300.0) -> ProcessObservation:
    return ProcessObservation(pid=4242, argv_digest=digest, started_at=NOW - timedelta(seconds=age), qmp=qmp)


def observed(**fields: Any) -> Observed:
    base: dict[str, Any] = {
        "process": None,
        "exit": None,
        "has_runtime_dir": False,
        "has_stale_runtime": False,
    }
    base.update(fields)
    return Observed(**base)


def exited(
    *, code: int | None = None, sig: int | None = None, ago: float = 1.0, ran: float = 5.0
) -> ExitObservation:
    at = NOW - timedelta(seconds=ago)
    return ExitObservation(
        at=at, exit_code=code, signal=sig, guest_shutdown=False, started_at=at - timedelta(seconds=ran)
    )


def kinds(result: Plan) -> list[type[Action]]:
    return [type(action) for action in result.actions]


@dataclass
class Row:
    desired: Desired | None
    observed: Observed
    memory: Memory = field(default_factory=Memory)
    intent: Intent = Intent.RUNNING
    actions: list[type[Action]] = field(default_factory=list)


VM = desired()
RUNNING = process(digest_for(VM))
ROWS = {
    "new-vm-allocates-ports-and-creates-disks": Row(
        VM, observed(bases=BASE_READY), intent=Intent.PREPARING, actions=[AllocatePorts, CreateDisk]
    ),
    "prepared-vm-spawns": Row(VM, observed(**ready()), intent=Intent.STARTING, actions=[Spawn]),
    "spawned-paused-vm-continues": Row(
        VM,
        observed(**ready(process=process(RUNNING.argv_digest, qmp=QmpState.PRELAUNCH, age=0.1))),
        intent=Intent.STARTING,
        actions=[Continue],
    ),
    "vm-paused-from-outside-is-left-paused": Row(
        VM,
        observed(**ready(process=process(RUNNING.argv_digest, qmp=QmpState.PAUSED))),
        intent=Intent.PAUSED,
    ),
    "running-vm-with-matching-digest-is-left-alone": Row(VM, observed(**ready(process=RUNNING))),
    "argv-digest-mismatch-restarts-gracefully": Row(
        VM,
        observed(**ready(process=process("other-digest"))),
        intent=Intent.RESTARTING,
        actions=[RequestPowerdown],
    ),
    "label-only-change-keeps-running": Row(
        replace(VM, generation=2), observed(**ready(process=RUNNING)), intent=Intent.RUNNING
    ),
    "dead-process-with-live-runtime-dir-respawns": Row(
        VM,
        observed(**ready(exit=exited(sig=9), has_runtime_dir=True, has_stale_runtime=True)),
        intent=Intent.STARTING,
        actions=[Spawn],
    ),
    "pid-reuse-is-no-process-of-ours": Row(
        # observe proved the pid belongs to someone else: no process, stale files, a vanished exit.
        VM,
        observed(**ready(exit=exited(), has_runtime_dir=True, has_stale_runtime=True)),
        intent=Intent.STARTING,
        actions=[Spawn],
    ),
    "qmp-unreachable-just-after-spawn-waits": Row(
        VM,
        observed(**ready(process=process(RUNNING.argv_digest, qmp=QmpState.UNREACHABLE, age=0.2))),
        intent=Intent.STARTING,
    ),
    "hung-process-is-killed": Row(
        VM,
        observed(**ready(process=process(RUNNING.argv_digest, qmp=QmpState.UNREACHABLE, age=60))),
        intent=Intent.RESTARTING,
        actions=[Kill],
    ),
    "panicked-guest-is-killed": Row(
        VM,
        observed(**ready(process=process(RUNNING.argv_digest, qmp=QmpState.PANICKED))),
        intent=Intent.RESTARTING,
        actions=[Kill],
    ),
    "halted-while-running-stops": Row(
        desired(runStrategy="Halted"),
        observed(**ready(process=RUNNING)),
        intent=Intent.STOPPING,
        actions=[RequestPowerdown],
    ),
    "halted-and-stopped-keeps-disks-and-ports": Row(
        desired(runStrategy="Halted"), observed(**ready()), intent=Intent.HALTED
    ),
    "invalid-spec-leaves-a-running-vm-alone": Row(
        desired(invalid=True), observed(**ready(process=RUNNING)), intent=Intent.INVALID
    ),
    "deleting-running-vm-stops-first": Row(
        desired(deleting=True),
        observed(**ready(process=RUNNING)),
        intent=Intent.DELETING,
        actions=[RequestPowerdown],
    ),
    "deleting-stopped-vm-releases-everything": Row(
        desired(deleting=True),
        observed(**ready(has_runtime_dir=True)),
        intent=Intent.DELETING,
        actions=[ReleasePorts, DeleteDisk, RemoveRuntimeDir],
    ),
    "deleting-vm-holding-nothing-finalizes-alone": Row(
        desired(deleting=True),
        observed(),
        intent=Intent.DELETING,
        actions=[Finalize],
    ),
    "deletion-during-backoff-tears-down": Row(
        desired(deleting=True),
        observed(**ready(exit=exited(sig=9), has_runtime_dir=True, has_stale_runtime=True)),
        memory=Memory(failures=3, next_retry_at=NOW + timedelta(minutes=1)),
        intent=Intent.DELETING,
        actions=[ReleasePorts, DeleteDisk, RemoveRuntimeDir],
    ),
    "retained-disk-survives-deletion": Row(
        desired(deleting=True),
        observed(ports={}, disks={"root": replace(ROOT_DISK, reclaim_policy=ReclaimPolicy.RETAIN)}),
        intent=Intent.DELETING,
        actions=[Finalize],
    ),
    "orphan-process-is-stopped": Row(
        None, observed(**ready(process=RUNNING)), intent=Intent.DELETING, actions=[RequestPowerdown]
    ),
    "orphan-leftovers-are-released-without-finalizing": Row(
        None,
        observed(**ready(has_runtime_dir=True)),
        intent=Intent.DELETING,
        actions=[ReleasePorts, DeleteDisk, RemoveRuntimeDir],
    ),
    "missing-image-waits-and-gives-its-ports-back": Row(
        VM,
        observed(**ready(missing_images=("tiny-guest/vmlinuz",))),
        intent=Intent.WAITING_FOR_IMAGES,
        actions=[ReleasePorts],
    ),
    "missing-image-takes-no-port": Row(
        VM,
        observed(**ready(ports={}, missing_images=("tiny-guest/vmlinuz",))),
        intent=Intent.WAITING_FOR_IMAGES,
    ),
    "removed-forward-and-disk-are-released-before-respawn": Row(
        desired(disks=[], network={"forwards": []}),
        observed(ports={HTTP: 20080}, disks={"root": ROOT_DISK}),
        intent=Intent.STARTING,
        actions=[ReleasePorts, DeleteDisk, Spawn],
    ),
    "guest-poweroff-under-rerun-on-failure-stays-stopped": Row(
        desired(runStrategy="RerunOnFailure"),
        observed(**ready(exit=exited(code=0), has_stale_runtime=True, has_runtime_dir=True)),
        intent=Intent.FINISHED,
        actions=[CleanRuntime],
    ),
    "guest-poweroff-under-always-restarts": Row(
        VM,
        observed(**ready(exit=exited(code=0), has_stale_runtime=True)),
        intent=Intent.STARTING,
        actions=[Spawn],
    ),
    "crash-under-rerun-on-failure-restarts": Row(
        desired(runStrategy="RerunOnFailure"),
        observed(**ready(exit=exited(code=1), has_stale_runtime=True)),
        intent=Intent.STARTING,
        actions=[Spawn],
    ),
    "exiting-process-waits-for-its-exit-record": Row(
        # The leader is a zombie, the pidfd has not fired: no spawn may race the runtime lock.
        VM,
        observed(**ready(exiting=True, has_runtime_dir=True)),
        intent=Intent.STOPPING,
    ),
    "repeated-crash-backs-off": Row(
        VM,
        observed(**ready(exit=exited(sig=9, ago=0.5), has_stale_runtime=True)),
        memory=Memory(failures=3),
        intent=Intent.BACKING_OFF,
    ),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_plan_table(row: Row) -> None:
    """Each situation gets its intent and exactly these actions, in this order."""
    result = plan(row.desired, row.observed, row.memory, CONTEXT, now=NOW)
    assert (result.intent, kinds(result)) == (row.intent, row.actions), result.detail


def test_graceful_stop_escalates_over_time() -> None:
    """Power button, then quit after stopTimeout, then SIGKILL after the quit grace."""
    vm = desired(runStrategy="Halted", stopTimeout=30)
    seen = observed(**ready(process=RUNNING))
    first = plan(vm, seen, Memory(), CONTEXT, now=NOW)
    assert kinds(first) == [RequestPowerdown]
    assert first.memory.stop_requested_at == NOW
    assert first.requeue_after == timedelta(seconds=30)
    waiting = plan(vm, seen, first.memory, CONTEXT, now=NOW + timedelta(seconds=10))
    assert (kinds(waiting), waiting.requeue_after) == ([], timedelta(seconds=20))
    quitting = plan(vm, seen, first.memory, CONTEXT, now=NOW + timedelta(seconds=31))
    assert kinds(quitting) == [Quit]
    killing = plan(vm, seen, first.memory, CONTEXT, now=NOW + timedelta(seconds=36))
    assert killing.actions == (Kill(RUNNING.pid, signal.SIGKILL),)


def test_stop_then_exit_is_not_a_failure() -> None:
    """An exit after the controller asked for a stop is stopped-by-controller and resets the stop."""
    memory = Memory(stop_requested_at=NOW - timedelta(seconds=2))
    result = plan(
        VM, observed(**ready(exit=exited(code=0), has_stale_runtime=True)), memory, CONTEXT, now=NOW
    )
    assert result.memory.last_exit is not None
    assert result.memory.last_exit.reason is ExitReason.STOPPED_BY_CONTROLLER
    assert (result.memory.failures, result.memory.stop_requested_at, result.memory.restarts) == (0, None, 0)
    assert kinds(result) == [Spawn]


def test_kill_counts_a_restart_and_a_failure() -> None:
    """kill -9 from outside: lastExit says killed by signal 9, restarts +1, immediate respawn."""
    result = plan(
        VM, observed(**ready(exit=exited(sig=9), has_stale_runtime=True)), Memory(), CONTEXT, now=NOW
    )
    last_exit = result.memory.last_exit
    assert last_exit is not None
    assert (last_exit.reason, last_exit.signal) == (ExitReason.KILLED, 9)
    assert (result.memory.restarts, result.memory.failures) == (1, 1)
    assert kinds(result) == [Spawn]


def test_absorbing_an_exit_is_idempotent() -> None:
    """Planning twice over the same exit record counts it once."""
    seen = observed(**ready(exit=exited(sig=9, ago=0.5), has_stale_runtime=True))
    once = plan(VM, seen, Memory(failures=2), CONTEXT, now=NOW)
    twice = plan(VM, seen, replace(once.memory, restarts=0), CONTEXT, now=NOW)
    assert once.memory.failures == twice.memory.failures == 3


def test_backoff_grows_and_a_stable_run_resets_it() -> None:
    """Crash loops wait longer each time; a crash after a long healthy run restarts at once."""
    quick = plan(
        VM,
        observed(**ready(exit=exited(sig=9, ran=5), has_stale_runtime=True)),
        Memory(failures=4),
        CONTEXT,
        now=NOW,
    )
    assert quick.intent is Intent.BACKING_OFF
    assert quick.memory.next_retry_at == NOW - timedelta(seconds=1) + timedelta(seconds=8)
    stable = plan(
        VM,
        observed(**ready(exit=exited(sig=9, ran=3600), has_stale_runtime=True)),
        Memory(failures=4),
        CONTEXT,
        now=NOW,
    )
    assert (stable.intent, stable.memory.failures) == (Intent.STARTING, 1)


def test_backoff_applies_after_reaching_running() -> None:
    """A VM that crashes soon after each start backs off even though it reached Running each time."""
    memory = Memory(
        failures=1, last_exit=LastExit(reason=ExitReason.KILLED, signal=9, at=NOW - timedelta(seconds=30))
    )
    result = plan(
        VM,
        observed(**ready(exit=exited(sig=9, ran=20, ago=0.1), has_stale_runtime=True)),
        memory,
        CONTEXT,
        now=NOW,
    )
    assert (result.intent, result.memory.failures) == (Intent.BACKING_OFF, 2)


def test_spawn_argv_uses_the_allocated_ports_and_disk_paths() -> None:
    """The Spawn action carries the argv built from what was allocated, and its digest."""
    result = plan(VM, observed(**ready()), Memory(), CONTEXT, now=NOW)
    (spawn,) = result.actions
    assert isinstance(spawn, Spawn)
    assert spawn.digest == argv_digest(spawn.argv)
    assert "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:20080-:80" in spawn.argv
    assert any(f"file.filename=/data/disks/{UID}/root.qcow2" in arg for arg in spawn.argv)


def test_requested_host_port_is_passed_to_allocation() -> None:
    """A forward with a hostPort asks for exactly that port."""
    result = plan(
        desired(network={"forwards": [{"guestPort": 22, "hostPort": 2222}]}),
        observed(),
        Memory(),
        CONTEXT,
        now=NOW,
    )
    allocate = result.actions[0]
    assert allocate == AllocatePorts((((Protocol.TCP, 22), 2222),))


def test_unreachable_process_asked_to_stop_gets_the_quit_grace() -> None:
    """QMP closing on the way out after a power-down is not a hang: no SIGKILL before the grace."""
    vm = desired(runStrategy="Halted")
    memory = Memory(stop_requested_at=NOW - timedelta(seconds=1))
    closing = observed(**ready(process=process(RUNNING.argv_digest, qmp=QmpState.UNREACHABLE)))
    waiting = plan(vm, closing, memory, CONTEXT, now=NOW)
    assert (kinds(waiting), waiting.requeue_after) == ([], timedelta(seconds=4))
    late = plan(vm, closing, memory, CONTEXT, now=NOW + timedelta(seconds=5))
    assert kinds(late) == [Kill]


def test_stop_request_survives_the_exiting_window() -> None:
    """Between the leader's exit and the exit record, the stop request is kept, so the exit is ours."""
    memory = Memory(stop_requested_at=NOW - timedelta(seconds=1))
    exiting = plan(VM, observed(**ready(exiting=True)), memory, CONTEXT, now=NOW)
    assert exiting.memory.stop_requested_at == memory.stop_requested_at
    recorded = plan(
        VM, observed(**ready(exit=exited(code=0), has_stale_runtime=True)), exiting.memory, CONTEXT, now=NOW
    )
    assert recorded.memory.last_exit is not None
    assert recorded.memory.last_exit.reason is ExitReason.STOPPED_BY_CONTROLLER
    assert recorded.memory.restarts == 0


def test_a_running_vm_is_looked_at_again_after_the_liveness_period() -> None:
    vm = desired()
    context = replace(CONTEXT, liveness_period=timedelta(seconds=10))
    result = plan(vm, observed(**ready(process=process(digest_for(vm)))), Memory(), context, now=NOW)
    assert (result.intent, result.requeue_after) == (Intent.RUNNING, timedelta(seconds=10))


def test_a_vm_whose_runtime_dir_or_socket_was_removed_is_killed_after_the_startup_grace() -> None:
    vm = desired()
    broken = replace(process(digest_for(vm)), runtime_intact=False)
    result = plan(vm, observed(**ready(process=broken)), Memory(), CONTEXT, now=NOW)
    assert (result.intent, kinds(result)) == (Intent.RESTARTING, [Kill])
    starting = replace(process(digest_for(vm), age=1.0), runtime_intact=False)
    assert plan(vm, observed(**ready(process=starting)), Memory(), CONTEXT, now=NOW).intent is Intent.RUNNING


def test_a_qemu_that_lost_its_runtime_dir_is_killed_before_anything_starts() -> None:
    result = plan(desired(), observed(**ready(lost_pid=31337)), Memory(), CONTEXT, now=NOW)
    assert result.intent is Intent.RESTARTING
    assert [(type(a), getattr(a, "pid", None)) for a in result.actions] == [(KillLost, 31337)]
    deleting = plan(desired(deleting=True), observed(**ready(lost_pid=31337)), Memory(), CONTEXT, now=NOW)
    assert kinds(deleting) == [KillLost]


# The stop ladder by what the guest can answer: (qmp, booted, stopTimeout, seconds since the stop
# was requested or None for the first plan) -> (actions, requeue seconds).
STOP_ROWS = {
    "booted: power button, full stopTimeout": (
        (QmpState.RUNNING, True, 300, None),
        ([RequestPowerdown], 300),
    ),
    "booted: still waiting at 2 s": ((QmpState.RUNNING, True, 300, 2), ([], 298)),
    "not booted: power button, a 2 s probe": ((QmpState.RUNNING, False, 300, None), ([RequestPowerdown], 2)),
    "not booted: waiting within the probe": ((QmpState.RUNNING, False, 300, 1), ([], 1)),
    "not booted: quit after the probe": ((QmpState.RUNNING, False, 300, 2), ([Quit], 5)),
    "not booted: SIGKILL after the quit grace": ((QmpState.RUNNING, False, 300, 7), ([Kill], 1)),
    "quit under way (QEMU announced its shutdown): no second quit": (
        (QmpState.SHUTDOWN, False, 300, 3),
        ([], 4),
    ),
    "announced its shutdown but still there after the grace: SIGKILL": (
        (QmpState.SHUTDOWN, False, 300, 7),
        ([Kill], 1),
    ),
    "not booted, stopTimeout below the probe": ((QmpState.RUNNING, False, 1, None), ([RequestPowerdown], 1)),
    "booted during the probe: full stopTimeout": ((QmpState.RUNNING, True, 300, 3), ([], 297)),
    "paused: quit at once": ((QmpState.PAUSED, True, 300, None), ([Quit], 5)),
    "paused: SIGKILL after the quit grace": ((QmpState.PAUSED, True, 300, 5), ([Kill], 1)),
}


@pytest.mark.parametrize(("situation", "expected"), STOP_ROWS.values(), ids=STOP_ROWS.keys())
def test_stop_ladder_by_what_the_guest_can_answer(
    situation: tuple[QmpState, bool, int, float | None], expected: tuple[list[type[Action]], float]
) -> None:
    qmp, booted, stop_timeout, elapsed = situation
    vm = desired(runStrategy="Halted", stopTimeout=stop_timeout)
    young = process(RUNNING.argv_digest, qmp=qmp, age=30)  # within BOOT_ASSUMED_AFTER
    seen = observed(**ready(process=replace(young, guest_booted=booted)))
    memory = Memory() if elapsed is None else Memory(stop_requested_at=NOW - timedelta(seconds=elapsed))
    result = plan(vm, seen, memory, CONTEXT, now=NOW)
    assert (kinds(result), result.requeue_after) == (expected[0], timedelta(seconds=expected[1]))
    assert result.memory.stop_requested_at == (NOW if elapsed is None else memory.stop_requested_at)


def test_a_guest_up_for_long_without_a_network_card_gets_the_full_stop_timeout() -> None:
    """No NIC came up (no virtio-net driver), but it has run past BOOT_ASSUMED_AFTER: it is taken
    as booted, so its ACPI shutdown is not cut short to the probe."""
    vm = desired(runStrategy="Halted", stopTimeout=300)
    for age, window in ((119, 2), (120, 300)):
        quiet = replace(process(RUNNING.argv_digest, age=age), guest_booted=False)
        result = plan(vm, observed(**ready(process=quiet)), Memory(), CONTEXT, now=NOW)
        assert (kinds(result), result.requeue_after) == ([RequestPowerdown], timedelta(seconds=window)), age


def test_a_stop_that_skips_the_wait_says_why() -> None:
    """The condition message (and so the Stopping event) names the rule that shortened the stop."""
    vm = desired(runStrategy="Halted", stopTimeout=300)
    booting = replace(process(RUNNING.argv_digest, age=30), guest_booted=False)
    probing = plan(vm, observed(**ready(process=booting)), Memory(), CONTEXT, now=NOW)
    assert probing.detail == (
        "runStrategy is Halted; the guest has not booted (no network card up): "
        "quit unless it powers off within 2 s"
    )
    paused = replace(RUNNING, qmp=QmpState.PAUSED)
    quitting = plan(vm, observed(**ready(process=paused)), Memory(), CONTEXT, now=NOW)
    assert (
        quitting.detail
        == "runStrategy is Halted; the guest is paused and cannot answer the power button: quit"
    )
