"""Table tests of the Reconciler on the fakes: stops, the stop ladder, quotas, every Finalize path."""

from __future__ import annotations

import signal
from datetime import timedelta
from pathlib import Path

import pytest

from api.types import ExitReason, Phase, ReclaimPolicy
from controller.actions import Finalize
from controller.plan import QUIT_GRACE
from controller.reconciler import Outcome
from tests.unit.reconciler_world import World, quotas, spec


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def running(world: World, name: str = "web", vm_spec: dict[str, object] | None = None) -> str:
    uid = world.add(name, vm_spec)
    await world.settle(uid)
    assert world.status(uid).phase is Phase.RUNNING
    return uid


def deaf(world: World, uid: str, *, quit_too: bool = False) -> None:
    """The guest ignores the power button (and QEMU `quit`, when `quit_too`)."""
    world.hv.processes[uid].obeys_powerdown = False
    world.hv.processes[uid].obeys_quit = not quit_too


async def test_halted_stops_gracefully_and_keeps_ports(world: World) -> None:
    uid = await running(world)
    ports = world.status(uid).ports
    world.change(uid, spec(runStrategy="Halted", network={"forwards": [{"guestPort": 80}]}))
    await world.settle(uid)
    status = world.status(uid)
    assert (status.phase, status.ports, status.restarts) == (Phase.STOPPED, ports, 0)
    assert status.last_exit is not None
    assert status.last_exit.reason is ExitReason.STOPPED_BY_CONTROLLER
    assert world.hv.commands[-1] == (uid, "system_powerdown")


async def test_halted_then_always_again_starts_without_counting_a_restart(world: World) -> None:
    uid = await running(world, vm_spec=spec())
    world.change(uid, spec(runStrategy="Halted"))
    await world.settle(uid)
    world.change(uid, spec())
    await world.settle(uid)
    assert (world.status(uid).phase, world.status(uid).restarts) == (Phase.RUNNING, 0)


async def test_the_stop_ladder_presses_the_button_then_quits_then_kills_on_time(world: World) -> None:
    uid = await running(world, vm_spec=spec(stopTimeout=20))
    pid = world.hv.pid_of(uid)
    deaf(world, uid, quit_too=True)
    world.override(uid, stopped=True)
    result = await world.settle(uid)
    assert (world.hv.commands[-1], result.requeue_after) == ((uid, "system_powerdown"), timedelta(seconds=20))
    result = await world.advance(uid, 19.5)
    assert world.hv.commands[-1] == (uid, "system_powerdown"), "nothing before stopTimeout"
    result = await world.advance(uid, 0.5)
    assert (world.hv.commands[-1], result.requeue_after) == ((uid, "quit"), QUIT_GRACE)
    assert world.hv.signals == []
    await world.advance(uid, QUIT_GRACE.total_seconds())
    assert world.hv.signals == [(uid, pid, signal.SIGKILL)]
    await world.settle(uid)
    status = world.status(uid)
    assert (status.phase, status.failures) == (Phase.STOPPED, 0)
    assert status.last_exit is not None
    assert status.last_exit.reason is ExitReason.STOPPED_BY_CONTROLLER


async def test_a_quit_ends_a_guest_that_ignores_the_button(world: World) -> None:
    uid = await running(world, vm_spec=spec(stopTimeout=5))
    deaf(world, uid)
    world.override(uid, stopped=True)
    await world.settle(uid)
    await world.advance(uid, 5)
    assert world.hv.signals == []
    assert world.hv.pid_of(uid) is None
    assert world.status(uid).phase is Phase.STOPPED


async def test_a_stop_in_progress_survives_a_controller_restart(world: World) -> None:
    uid = await running(world, vm_spec=spec(stopTimeout=20))
    deaf(world, uid, quit_too=True)
    world.override(uid, stopped=True)
    await world.settle(uid)
    world.clock.advance(10)
    world.hv.restart_controller()
    result = await world.settle(uid)
    assert result.requeue_after == timedelta(seconds=10), "the ladder goes on where it was"
    assert [command for _, command in world.hv.commands].count("system_powerdown") == 1


async def test_quota_admits_the_oldest_and_holds_the_rest_pending(world: World) -> None:
    world.quotas.quotas = quotas(max_vms=1)
    first = await running(world, "a", spec())
    second = world.add("b", spec())
    result = await world.settle(second)
    status = world.status(second)
    assert (status.phase, world.hv.pid_of(second), result.requeue_after) == (
        Phase.PENDING,
        None,
        timedelta(seconds=5),
    )
    admitted = next(c for c in status.conditions if c.type == "Admitted")
    assert (admitted.status.value, admitted.reason) == ("False", "QuotaExceeded")
    assert world.status(first).phase is Phase.RUNNING


async def test_freeing_room_admits_the_waiting_vm(world: World) -> None:
    world.quotas.quotas = quotas(max_vms=1)
    first = await running(world, "a", spec())
    second = world.add("b", spec())
    await world.settle(second)
    world.change(first, spec(runStrategy="Halted"))
    await world.settle(first)
    await world.advance(second, 5)
    assert world.status(second).phase is Phase.RUNNING
    assert "Scheduled" in world.events(second)


async def test_a_lowered_quota_never_stops_a_running_vm(world: World) -> None:
    uid = await running(world, "a", spec())
    world.add("b", spec())
    world.quotas.quotas = quotas(max_vms=0)
    await world.settle(uid)
    assert world.status(uid).phase is Phase.RUNNING


async def test_finalize_a_vm_that_never_ran_in_one_pass(world: World) -> None:
    uid = world.add("web")
    world.delete(uid)
    result = await world.step(uid)
    assert result.outcome is Outcome.SUCCESS
    assert world.uid_gone(uid)
    assert world.events(uid) == ["Deleted"]


async def test_finalize_a_running_vm_after_its_graceful_stop_and_teardown(world: World) -> None:
    uid = await running(world)
    world.delete(uid)
    writes = len(world.store.status_writes)
    await world.settle(uid)
    assert world.uid_gone(uid)
    assert world.hv.commands[-1] == (uid, "system_powerdown")
    assert await world.store.held_by(uid) == ([], [])
    assert uid not in world.hv.runtime_dirs
    assert world.events(uid)[-1] == "Deleted"
    assert len(world.store.status_writes) > writes, "the stop was shown before the object went"


async def test_finalize_comes_alone_after_the_teardown_is_told(world: World) -> None:
    uid = await running(world)
    world.hv.exit(uid, code=0, guest_shutdown=True)
    world.delete(uid)
    result = await world.step(uid)
    assert result.requeue_after == timedelta(0)
    assert not world.uid_gone(uid)
    finals = await world.step(uid)
    assert finals.outcome is Outcome.SUCCESS
    assert world.uid_gone(uid)
    assert world.events(uid)[-1] == "Deleted"


async def test_finalize_deletes_delete_disks_and_keeps_retained_ones(world: World) -> None:
    uid = world.add("web", spec())
    scratch = world.disk(uid, "scratch", ReclaimPolicy.DELETE)
    data = world.disk(uid, "data", ReclaimPolicy.RETAIN)
    world.delete(uid)
    await world.settle(uid)
    assert world.uid_gone(uid)
    assert (scratch.exists(), data.exists()) == (False, True)
    assert [row.name for row in await world.store.retained_disks()] == ["data"]
    assert "DiskDeleted" in world.events(uid)


async def test_finalize_a_deaf_vm_after_the_whole_ladder(world: World) -> None:
    uid = await running(world, vm_spec=spec(stopTimeout=3))
    deaf(world, uid, quit_too=True)
    world.delete(uid)
    await world.settle(uid)
    await world.advance(uid, 3)
    await world.advance(uid, QUIT_GRACE.total_seconds())
    await world.settle(uid)
    assert world.uid_gone(uid)
    assert world.hv.signals[-1][2] == signal.SIGKILL


async def test_finalize_during_a_crash_loop_backoff_does_not_wait_for_it(world: World) -> None:
    uid = await running(world, vm_spec=spec())
    for _ in range(3):
        world.hv.exit(uid, code=1)
        await world.settle(uid)
        if world.hv.pid_of(uid) is None:
            break
        world.clock.advance(1)
    assert world.status(uid).phase is Phase.CRASH_LOOP_BACK_OFF
    world.delete(uid)
    await world.settle(uid)
    assert world.uid_gone(uid)


async def test_an_orphan_is_torn_down_and_nothing_is_finalized_or_written(world: World) -> None:
    uid = await running(world)
    pid = world.hv.pid_of(uid)
    world.store._vms.pop(uid)  # the object is gone, its process and ports are not
    writes = len(world.store.status_writes)
    await world.settle(uid)
    await world.settle(uid)
    assert world.hv.pid_of(uid) is None
    assert pid is not None
    assert await world.store.held_by(uid) == ([], [])
    assert uid not in world.hv.runtime_dirs
    assert len(world.store.status_writes) == writes
    assert "Deleted" not in world.events(uid)


async def test_finalize_is_planned_alone_and_only_once_nothing_is_held(world: World) -> None:
    uid = await running(world)
    world.delete(uid)
    seen: list[list[str]] = []
    for _ in range(8):
        if world.uid_gone(uid):
            break
        await world.step(uid)
        seen.append(world.last_actions)
    finals = [actions for actions in seen if Finalize.__name__ in actions]
    assert finals == [[Finalize.__name__]]


async def test_shutting_down_stops_every_vm_and_starts_none(world: World) -> None:
    uid = await running(world, "a", spec())
    other = world.add("b", spec())
    world.shutting_down = True
    await world.settle(uid)
    await world.settle(other)
    assert (world.hv.pid_of(uid), world.hv.pid_of(other)) == (None, None)
    last_exit = world.status(uid).last_exit
    assert last_exit is not None
    assert last_exit.reason is ExitReason.STOPPED_BY_CONTROLLER
