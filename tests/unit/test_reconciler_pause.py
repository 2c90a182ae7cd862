"""Table tests of pause and unpause on the Reconciler's fakes (tests/unit/reconciler_world.py).

A pause belongs to the QEMU running when it was asked for: it survives a controller restart
(the same QEMU is adopted), not a new QEMU (a crash restart comes back running, as KubeVirt's
VMI does). A pause from outside is shown and left alone until an unpause asked after it.
"""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import pytest

from api.store.vms import RunAction, next_override
from api.types import ConditionStatus, Phase, QemuVMStatus
from controller.plan import QMP_STARTUP_GRACE
from controller.reconciler import Outcome
from tests.unit.reconciler_world import LIVENESS, World, spec


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def running(world: World) -> str:
    uid = world.add("web")
    await world.settle(uid)
    assert world.status(uid).phase is Phase.RUNNING
    return uid


def ask(world: World, uid: str, action: RunAction, *, by: str = "alice") -> None:
    """What the API's POST .../pause (or unpause, stop, start) records, at the clock's now."""
    record = world.record(uid)
    override = next_override(record.run_override, action, by=by, now=world.clock.now())
    world.store.put(replace(record, override=override.model_dump(mode="json", by_alias=True)))


def ready(status: QemuVMStatus) -> tuple[ConditionStatus, str, str]:
    condition = next(c for c in status.conditions if c.type == "Ready")
    return condition.status, condition.reason, condition.message


def commands(world: World, uid: str) -> list[str]:
    return [command for each, command in world.hv.commands if each == uid]


async def test_pause_stops_the_guest_and_shows_paused_not_ready_with_who_asked(world: World) -> None:
    uid = await running(world)
    world.clock.advance(1)
    ask(world, uid, RunAction.PAUSE)
    result = await world.settle(uid)
    assert commands(world, uid) == ["cont", "stop"]
    status = world.status(uid)
    assert (status.phase, status.pid) == (Phase.PAUSED, world.hv.pid_of(uid))
    assert ready(status) == (ConditionStatus.FALSE, "PausedByRequest", "paused at the request of alice")
    assert world.events(uid)[-1] == "Paused"
    assert world.store.events[-1].message == "pausing at the request of alice"
    assert status.observed_generation == 1, "a paused VM is steady at its generation"
    # Still looked at every liveness period (a hung paused QEMU is found), and nothing is
    # written while it stays paused.
    assert (result.outcome, result.requeue_after) == (Outcome.REQUEUE, LIVENESS)
    writes = len(world.store.status_writes)
    await world.advance(uid, LIVENESS.total_seconds())
    assert len(world.store.status_writes) == writes
    assert commands(world, uid) == ["cont", "stop"], "the controller does not undo the pause"


async def test_unpause_continues_the_guest_and_tells_who_asked(world: World) -> None:
    uid = await running(world)
    world.clock.advance(1)
    ask(world, uid, RunAction.PAUSE)
    await world.settle(uid)
    world.clock.advance(1)
    ask(world, uid, RunAction.UNPAUSE, by="bob")
    await world.settle(uid)
    assert commands(world, uid) == ["cont", "stop", "cont"]
    status = world.status(uid)
    assert (status.phase, status.paused_since) == (Phase.RUNNING, None)
    assert ready(status)[:2] == (ConditionStatus.TRUE, "Running")
    assert world.events(uid)[-2:] == ["Paused", "Unpaused"]
    assert world.store.events[-1].message == "unpaused at the request of bob"


async def test_a_paused_vm_stays_paused_across_a_controller_restart(world: World) -> None:
    uid = await running(world)
    world.clock.advance(1)
    ask(world, uid, RunAction.PAUSE)
    await world.settle(uid)
    pid, events = world.hv.pid_of(uid), world.events(uid)
    world.hv.restart_controller()
    await world.settle(uid)
    status = world.status(uid)
    assert (status.phase, status.pid) == (Phase.PAUSED, pid)
    assert commands(world, uid) == ["cont", "stop"], "the adopted QEMU is not continued"
    assert world.events(uid) == events, "nothing new to tell"


async def test_a_crash_restart_of_a_paused_vm_comes_back_running(world: World) -> None:
    """KubeVirt's choice: the pause was of the QEMU that crashed, not of the VM."""
    uid = await running(world)
    world.clock.advance(1)
    ask(world, uid, RunAction.PAUSE)
    await world.settle(uid)
    old = world.hv.pid_of(uid)
    world.clock.advance(1)
    world.hv.exit(uid, signal=signal.SIGKILL)
    await world.settle(uid)
    await world.settle(uid)
    status = world.status(uid)
    assert (status.phase, status.restarts, status.paused_since) == (Phase.RUNNING, 1, None)
    assert world.hv.pid_of(uid) not in (None, old)
    assert commands(world, uid)[-1] == "cont"


async def test_a_hung_paused_qemu_is_still_found_by_liveness_and_replaced(world: World) -> None:
    uid = await running(world)
    world.clock.advance(QMP_STARTUP_GRACE.total_seconds())
    ask(world, uid, RunAction.PAUSE)
    await world.settle(uid)
    old = world.hv.pid_of(uid)
    world.hv.processes[uid].hung = True
    await world.advance(uid, LIVENESS.total_seconds())
    assert (uid, old, signal.SIGKILL) in world.hv.signals
    await world.settle(uid)
    await world.settle(uid)
    assert world.status(uid).phase is Phase.RUNNING
    assert world.hv.pid_of(uid) not in (None, old)


async def test_a_pause_from_outside_is_shown_and_not_fought(world: World) -> None:
    uid = await running(world)
    world.clock.advance(1)
    world.hv.pause_from_outside(uid)
    await world.settle(uid)
    status = world.status(uid)
    assert status.phase is Phase.PAUSED
    assert ready(status)[:2] == (ConditionStatus.FALSE, "PausedOutside")
    assert "tofu-qemu unpause" in ready(status)[2]
    assert world.events(uid)[-1] == "Paused"
    await world.advance(uid, LIVENESS.total_seconds())
    assert commands(world, uid) == ["cont"], "no cont of a pause the controller did not make"
    world.clock.advance(1)
    ask(world, uid, RunAction.UNPAUSE)
    await world.settle(uid)
    assert commands(world, uid) == ["cont", "cont"]
    assert world.status(uid).phase is Phase.RUNNING


async def test_an_unpause_asked_before_an_outside_pause_does_not_undo_it(world: World) -> None:
    uid = await running(world)
    world.clock.advance(1)
    ask(world, uid, RunAction.PAUSE)
    await world.settle(uid)
    world.clock.advance(1)
    ask(world, uid, RunAction.UNPAUSE)
    await world.settle(uid)
    world.clock.advance(60)
    world.hv.pause_from_outside(uid)
    await world.settle(uid)
    await world.advance(uid, LIVENESS.total_seconds())
    assert world.status(uid).phase is Phase.PAUSED
    assert commands(world, uid) == ["cont", "stop", "cont"]


async def test_a_pause_asked_while_stopped_does_not_hold_the_next_start(world: World) -> None:
    uid = await running(world)
    ask(world, uid, RunAction.STOP)
    await world.settle(uid)
    await world.settle(uid)
    assert world.status(uid).phase is Phase.STOPPED
    world.clock.advance(1)
    ask(world, uid, RunAction.PAUSE)
    world.clock.advance(1)
    ask(world, uid, RunAction.START)
    assert world.record(uid).run_override is not None
    await world.settle(uid)
    assert world.status(uid).phase is Phase.RUNNING


async def test_stop_of_a_paused_vm_quits_at_once_and_start_runs_it(world: World) -> None:
    uid = await running(world)
    world.clock.advance(1)
    ask(world, uid, RunAction.PAUSE)
    await world.settle(uid)
    ask(world, uid, RunAction.STOP)
    await world.settle(uid)
    await world.settle(uid)
    assert commands(world, uid)[-1] == "quit", "a paused guest cannot answer the power button"
    assert world.status(uid).phase is Phase.STOPPED
    world.clock.advance(1)
    ask(world, uid, RunAction.START)
    await world.settle(uid)
    assert world.status(uid).phase is Phase.RUNNING


async def test_start_strategy_paused_never_continues_until_unpause_and_each_new_qemu_waits_again(
    world: World,
) -> None:
    uid = world.add("web", spec(startStrategy="Paused"))
    result = await world.settle(uid)
    status = world.status(uid)
    assert (status.phase, status.pid) == (Phase.PAUSED, world.hv.pid_of(uid))
    assert ready(status)[:2] == (ConditionStatus.FALSE, "StartedPaused")
    assert commands(world, uid) == [], "no cont: the guest never ran"
    assert result.requeue_after == LIVENESS
    world.hv.restart_controller()
    await world.settle(uid)
    assert (world.status(uid).phase, commands(world, uid)) == (Phase.PAUSED, [])
    world.clock.advance(1)
    ask(world, uid, RunAction.UNPAUSE)
    await world.settle(uid)
    assert (world.status(uid).phase, commands(world, uid)) == (Phase.RUNNING, ["cont"])
    world.clock.advance(1)
    world.hv.exit(uid, signal=signal.SIGKILL)
    await world.settle(uid)
    await world.settle(uid)
    assert world.status(uid).phase is Phase.PAUSED, "the strategy holds every start, as KubeVirt's"
    assert commands(world, uid) == ["cont"]
