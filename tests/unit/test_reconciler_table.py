"""Table tests of the Reconciler on the fakes and a ManualClock: start, crash, adopt, change.

Each test drives reconciles by hand (tests/unit/reconciler_world.py) and checks what the store
and the fake hypervisor hold after them. One reconcile is one pass: observe, plan, execute,
status written at most once.
"""

from __future__ import annotations

import signal
from datetime import timedelta
from pathlib import Path

import pytest

from api.types import ExitReason, Phase
from controller.hypervisor_fake import FakeProcess
from controller.plan import QMP_STARTUP_GRACE
from controller.reconciler import Outcome
from tests.unit.reconciler_world import LIVENESS, WEB, World, spec


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def running(world: World, name: str = "web", vm_spec: dict[str, object] | None = None) -> str:
    uid = world.add(name, vm_spec)
    result = await world.settle(uid)
    assert world.status(uid).phase is Phase.RUNNING, world.status(uid)
    assert result.requeue_after == LIVENESS
    return uid


async def test_a_new_vm_runs_after_three_passes_each_writing_status_at_most_once(world: World) -> None:
    """Ports, then the spawn that continues the guest itself, then the pass that sees it run."""
    uid = world.add("web")
    intents = []
    for _ in range(3):
        writes = len(world.store.status_writes)
        result = await world.step(uid)
        assert len(world.store.status_writes) - writes <= 1
        intents.append(result.requeue_after)
    assert intents == [timedelta(0), timedelta(0), LIVENESS]
    status = world.status(uid)
    assert (status.phase, status.pid, status.restarts) == (Phase.RUNNING, world.hv.pid_of(uid), 0)
    assert [(p.guest_port, 21500 <= p.host_port <= 21599) for p in status.ports] == [(80, True)]
    assert world.hv.commands == [(uid, "cont")]
    assert world.events(uid) == ["Scheduled", "PortsAllocated", "Started"]


async def test_a_vm_without_forwards_allocates_nothing(world: World) -> None:
    uid = await running(world, vm_spec=spec())
    assert world.status(uid).ports == ()
    assert "PortsAllocated" not in world.events(uid)


async def test_a_running_vm_is_left_alone_and_looked_at_again_after_the_liveness_period(world: World) -> None:
    uid = await running(world)
    writes = len(world.store.status_writes)
    result = await world.step(uid)
    assert (result.outcome, result.requeue_after) == (Outcome.REQUEUE, LIVENESS)
    assert len(world.store.status_writes) == writes, "nothing changed, nothing written"


async def test_a_kill_is_counted_once_and_restarts_at_once(world: World) -> None:
    uid = await running(world)
    old = world.hv.pid_of(uid)
    world.hv.exit(uid, signal=signal.SIGKILL)
    assert world.woken == [uid], "the exit source wakes the VM"
    await world.settle(uid)
    await world.settle(uid)
    status = world.status(uid)
    assert status.last_exit is not None
    assert (status.last_exit.reason, status.last_exit.signal) == (
        ExitReason.KILLED,
        9,
    )
    assert (status.phase, status.restarts, status.failures) == (Phase.RUNNING, 1, 1)
    assert world.hv.pid_of(uid) not in (None, old)
    assert world.restarts == ["killed-by-signal"]


async def test_the_exit_count_is_stored_before_the_respawn(world: World) -> None:
    """The pass that folds an exit in only stores it; the spawn comes in the next pass."""
    uid = await running(world)
    world.hv.exit(uid, signal=signal.SIGKILL)
    result = await world.step(uid)
    assert result.requeue_after == timedelta(0)
    assert world.hv.pid_of(uid) is None, "no spawn before the count is stored"
    assert world.status(uid).restarts == 1
    await world.step(uid)
    assert world.hv.pid_of(uid) is not None


async def test_a_crash_loop_backs_off_longer_each_time(world: World) -> None:
    uid = await running(world)
    waits = []
    for _ in range(4):
        world.clock.advance(1)
        world.hv.exit(uid, code=1)
        result = await world.settle(uid)
        if world.status(uid).phase is Phase.CRASH_LOOP_BACK_OFF:
            assert result.requeue_after is not None
            waits.append(result.requeue_after.total_seconds())
            await world.advance(uid, result.requeue_after.total_seconds())
        await world.settle(uid)
    assert waits == [1.0, 2.0, 4.0]
    assert world.status(uid).failures == 4
    assert world.status(uid).restarts == 4


async def test_a_crash_after_a_long_healthy_run_restarts_at_once(world: World) -> None:
    uid = await running(world)
    world.hv.exit(uid, code=1)
    await world.settle(uid)
    await world.settle(uid)
    world.clock.advance(1)
    world.hv.exit(uid, code=1)
    result = await world.settle(uid)
    assert (world.status(uid).failures, result.requeue_after) == (2, timedelta(seconds=1)), "backing off"
    await world.advance(uid, 1)
    world.clock.advance(3600)
    world.hv.exit(uid, code=1)
    result = await world.settle(uid)
    assert world.status(uid).failures == 1, "a run of 60 s or more resets the count"
    assert (world.status(uid).phase, result.requeue_after) == (Phase.RUNNING, LIVENESS)


async def test_a_guest_poweroff_under_always_restarts_without_a_failure(world: World) -> None:
    uid = await running(world)
    world.hv.exit(uid, code=0, guest_shutdown=True)
    await world.settle(uid)
    status = world.status(uid)
    assert (status.phase, status.restarts, status.failures) == (Phase.RUNNING, 1, 0)
    assert status.last_exit is not None
    assert status.last_exit.reason is ExitReason.GUEST_POWEROFF


async def test_a_guest_poweroff_under_rerun_on_failure_stays_stopped(world: World) -> None:
    uid = await running(world, vm_spec=spec(runStrategy="RerunOnFailure"))
    world.hv.exit(uid, code=0, guest_shutdown=True)
    result = await world.settle(uid)
    status = world.status(uid)
    assert (status.phase, status.restarts, world.hv.pid_of(uid)) == (Phase.STOPPED, 0, None)
    assert result.outcome is Outcome.SUCCESS


async def test_a_crash_under_rerun_on_failure_restarts(world: World) -> None:
    uid = await running(world, vm_spec=spec(runStrategy="RerunOnFailure"))
    world.hv.exit(uid, code=1)
    await world.settle(uid)
    assert (world.status(uid).phase, world.status(uid).restarts) == (Phase.RUNNING, 1)


async def test_a_qemu_that_cannot_start_is_a_crash_with_its_stderr(world: World) -> None:
    uid = world.add("web")
    world.hv.failing_spawns[uid] = "qemu: could not load kernel"
    await world.settle(uid)
    await world.settle(uid)
    status = world.status(uid)
    assert status.last_exit is not None
    assert "could not load kernel" in status.last_exit.message
    assert status.failures == 1


async def test_a_second_process_holding_the_lock_is_a_transient_error(world: World) -> None:
    uid = world.add("web", spec())
    # A QEMU of this VM that this controller cannot see (another controller's) holds the lock.
    world.hv.processes[uid] = FakeProcess(
        999, ("qemu",), "other", world.clock.now(), watched=False, dir_removed=True
    )
    result = await world.step(uid)
    assert result.outcome is Outcome.TRANSIENT_ERROR
    assert "runtime lock" in (result.error or "")
    assert world.status(uid).phase is Phase.FAILED


async def test_adoption_attaches_first_and_keeps_pid_status_and_count(world: World) -> None:
    uid = await running(world)
    pid = world.hv.pid_of(uid)
    world.hv.restart_controller()
    writes = len(world.store.status_writes)
    result = await world.step(uid)
    assert result.requeue_after == timedelta(0)
    assert len(world.store.status_writes) == writes, "adopting leaves status as it was"
    assert world.hv.processes[uid].watched
    await world.settle(uid)
    status = world.status(uid)
    assert (status.phase, status.pid, status.restarts) == (Phase.RUNNING, pid, 0)


async def test_an_adopted_process_of_an_older_spec_is_restarted_gracefully(world: World) -> None:
    uid = await running(world)
    world.hv.restart_controller()
    world.change(uid, spec(memory=512, network=WEB["network"]))
    await world.settle(uid)
    assert (uid, "system_powerdown") in world.hv.commands
    await world.settle(uid)
    status = world.status(uid)
    assert (status.phase, status.observed_generation, status.restarts) == (Phase.RUNNING, 2, 0)
    assert status.last_exit is not None
    assert status.last_exit.reason is ExitReason.STOPPED_BY_CONTROLLER


async def test_an_exit_while_no_controller_watched_is_recorded_then_counted_once(world: World) -> None:
    uid = await running(world)
    world.hv.restart_controller()
    world.hv.exit(uid, signal=signal.SIGKILL)
    result = await world.step(uid)
    assert result.requeue_after == timedelta(0)
    assert uid in world.hv.exits
    for _ in range(3):
        await world.settle(uid)
    status = world.status(uid)
    assert (status.restarts, status.phase) == (1, Phase.RUNNING)
    last_exit = status.last_exit
    assert last_exit is not None
    assert (last_exit.reason, last_exit.signal) == (ExitReason.KILLED, 9), "its supervisor saw the kill"


async def test_a_qemu_from_before_supervisors_that_died_unwatched_has_vanished(world: World) -> None:
    uid = await running(world)
    world.hv.processes[uid].supervised = False
    world.hv.restart_controller()
    world.hv.exit(uid, signal=signal.SIGKILL)
    for _ in range(3):
        await world.settle(uid)
    last_exit = world.status(uid).last_exit
    assert last_exit is not None
    assert last_exit.reason is ExitReason.VANISHED
    assert world.status(uid).restarts == 1


async def test_a_runtime_dir_removed_under_a_running_vm_gets_it_replaced(world: World) -> None:
    uid = await running(world)
    old = world.hv.pid_of(uid)
    world.hv.remove_runtime_dir(uid)
    result = await world.settle(uid)
    assert world.hv.pid_of(uid) == old, "within the start-up grace it is waited for"
    world.clock.advance(QMP_STARTUP_GRACE.total_seconds())
    result = await world.settle(uid)
    assert (uid, old, signal.SIGKILL) in world.hv.signals
    await world.settle(uid)
    assert world.hv.pid_of(uid) not in (None, old)
    assert result is not None
    assert world.status(uid).phase is Phase.RUNNING


async def test_a_runtime_dir_removed_while_the_controller_was_down_gives_no_duplicate(world: World) -> None:
    uid = await running(world)
    old = world.hv.pid_of(uid)
    world.hv.restart_controller()
    world.hv.remove_runtime_dir(uid)
    await world.settle(uid)
    assert (uid, old, signal.SIGKILL) in world.hv.signals, "the lost QEMU is killed first"
    await world.settle(uid)
    alive = [proc for proc in world.hv.processes.values() if proc.alive]
    assert [proc.pid for proc in alive] == [world.hv.pid_of(uid)]
    assert old != world.hv.pid_of(uid)


async def test_a_generation_change_mid_boot_restarts_with_the_new_spec(world: World) -> None:
    uid = world.add("web", spec())
    await world.step(uid)  # spawns, paused
    assert world.hv.processes[uid].alive
    world.change(uid, spec(memory=384))
    await world.settle(uid)
    await world.settle(uid)
    status = world.status(uid)
    assert (status.phase, status.observed_generation, status.restarts) == (Phase.RUNNING, 2, 0)
    assert "-m" in world.hv.processes[uid].argv
    assert "384" in " ".join(world.hv.processes[uid].argv)


async def test_a_label_only_change_moves_observed_generation_without_a_restart(world: World) -> None:
    uid = await running(world)
    pid = world.hv.pid_of(uid)
    world.change(uid, dict(WEB))
    await world.settle(uid)
    assert (world.status(uid).observed_generation, world.hv.pid_of(uid)) == (2, pid)


async def test_a_qemu_that_hangs_is_killed_after_the_grace_and_restarted(world: World) -> None:
    uid = await running(world)
    world.clock.advance(QMP_STARTUP_GRACE.total_seconds())
    world.hv.processes[uid].hung = True
    await world.settle(uid)
    assert world.hv.signals
    assert world.hv.signals[-1][2] == signal.SIGKILL
    await world.settle(uid)
    status = world.status(uid)
    assert (status.phase, status.restarts) == (Phase.RUNNING, 1)


async def test_a_qemu_that_does_not_answer_right_after_spawn_is_waited_for(world: World) -> None:
    uid = world.add("web", spec())
    await world.step(uid)
    world.hv.processes[uid].hung = True
    result = await world.step(uid)
    assert (result.requeue_after, world.hv.signals) == (timedelta(milliseconds=200), [])
    assert world.status(uid).phase is Phase.STARTING


async def test_the_spawn_pass_continues_the_guest_itself(world: World) -> None:
    """No pass of its own for `cont`: the one that spawns sends it once QMP is connected."""
    uid = world.add("web", spec())
    result = await world.step(uid)
    assert (world.last_actions, world.hv.commands) == (["Spawn"], [(uid, "cont")])
    assert result.requeue_after == timedelta(0)
    assert world.status(uid).phase is Phase.RUNNING, "the look after acting saw the guest run"
    writes = len(world.store.status_writes)
    await world.step(uid)
    assert (world.last_actions, world.status(uid).phase) == ([], Phase.RUNNING)
    assert len(world.store.status_writes) == writes, "one status write per start, not two"


async def test_a_cont_unanswered_right_after_spawn_is_sent_again_by_the_next_pass(world: World) -> None:
    """Not an error of the spawn pass: the guest waits in prelaunch, and a later pass continues it."""
    uid = world.add("web", spec())
    world.hv.silent_spawns.add(uid)
    result = await world.step(uid)
    assert (result.outcome, world.last_actions, world.hv.commands) == (Outcome.REQUEUE, ["Spawn"], [])
    assert world.status(uid).phase is Phase.STARTING
    world.hv.processes[uid].hung = False
    await world.settle(uid)
    assert (world.status(uid).phase, world.hv.commands) == (Phase.RUNNING, [(uid, "cont")])
    assert "ReconcileError" not in world.events(uid)


async def test_an_invalid_spec_keeps_the_running_vm(world: World) -> None:
    uid = await running(world)
    pid = world.hv.pid_of(uid)
    world.change(uid, {"memory": "lots"}, error="spec.memory: not a quantity")
    await world.settle(uid)
    assert (world.status(uid).phase, world.hv.pid_of(uid)) == (Phase.INVALID, pid)


async def test_a_restart_request_restarts_once_and_counts_it(world: World) -> None:
    uid = await running(world)
    pid = world.hv.pid_of(uid)
    world.clock.advance(1)
    world.override(uid, restart=True)
    for _ in range(3):
        await world.settle(uid)
    status = world.status(uid)
    assert (status.phase, status.restarts) == (Phase.RUNNING, 1)
    assert world.hv.pid_of(uid) != pid
