"""Table tests of what each reconcile pass stores: status and events in one store write, none
for a pass that only hands over to the next one (controller/reconciler.py `_hands_over`).

`MemoryStore.transactions` counts the writes the SQL store commits (a status with its events is
one); tests/component/test_store_contract.py holds the store to the same count's meaning.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from api.types import Phase, Protocol
from controller.reconciler import Outcome
from tests.unit.reconciler_world import FIRST_PORT, World, spec


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@dataclass(frozen=True, slots=True)
class Stored:
    """What one pass stored: statuses written, event batches, store transactions."""

    statuses: int
    event_batches: int
    transactions: int


async def pass_by_pass(world: World, uid: str, passes: int) -> list[Stored]:
    stored = []
    for _ in range(passes):
        store = world.store
        before = (len(store.status_writes), len(store.event_writes), store.transactions)
        await world.step(uid)
        after = (len(store.status_writes), len(store.event_writes), store.transactions)
        stored.append(Stored(*(a - b for a, b in zip(after, before, strict=True))))
    return stored


def batches(world: World, last: int) -> list[list[str]]:
    return [[event.reason for event in batch] for batch in world.store.event_writes[-last:]]


async def test_a_new_vm_to_running_costs_one_store_write(world: World) -> None:
    """AllocatePorts hands over with nothing of its own to store; the Spawn pass (which also
    continues the guest, then looks again) stores Running with Scheduled, PortsAllocated and
    Started in one transaction; the pass after it sees the same and stores nothing."""
    uid = world.add("web")
    assert await pass_by_pass(world, uid, 3) == [Stored(0, 0, 0), Stored(1, 1, 1), Stored(0, 0, 0)]
    assert world.status(uid).phase is Phase.RUNNING
    assert batches(world, 1) == [["Scheduled", "PortsAllocated", "Started"]]
    assert world.store.transactions == 1


async def test_ten_new_vms_cost_one_store_write_each(world: World) -> None:
    uids = [world.add(f"vm-{index}") for index in range(10)]
    for uid in uids:
        await world.settle(uid)
    assert {world.status(uid).phase for uid in uids} == {Phase.RUNNING}
    assert world.store.transactions == 10
    assert len({port.host_port for uid in uids for port in world.status(uid).ports}) == 10


async def test_a_pass_that_stored_nothing_loses_no_event_when_the_controller_dies(world: World) -> None:
    """After the AllocatePorts pass the ports are in the ledger and nowhere in status. The
    Reconciler keeps nothing between passes, so the next pass is what a restarted controller
    runs: it tells the ports once, with the admission and the start."""
    uid = world.add("web")
    await world.step(uid)
    assert (world.store.transactions, world.store.events, world.status(uid).ports) == (0, [], ())
    assert len((await world.store.held_by(uid))[0]) == 1
    world.hv.restart_controller()
    await world.settle(uid)
    assert world.events(uid) == ["Scheduled", "PortsAllocated", "Started"]
    ports = [(p.guest_port, p.host_port) for p in world.status(uid).ports]
    held = [(row.guest_port, row.host_port) for row in (await world.store.held_by(uid))[0]]
    assert ports == held != []


async def test_a_kill_stores_the_exit_with_its_events_then_the_start_running(world: World) -> None:
    """Two writes: the exit and count (before the spawn clears its record), then Started with
    Running."""
    uid = world.add("web", spec())
    await world.settle(uid)
    transactions = world.store.transactions
    world.hv.exit(uid, signal=signal.SIGKILL)
    await world.settle(uid)
    assert world.status(uid).phase is Phase.RUNNING
    assert world.store.transactions - transactions == 2
    assert batches(world, 2) == [["ExitDetected", "Restarted"], ["Started"]]


async def test_a_pass_that_fails_stores_its_error_even_when_it_would_hand_over(world: World) -> None:
    """AllocatePorts is planned with requeue(0), but the hostPort is another VM's: the error is
    a condition and an event at once, in one write, and a retry that fails alike stores nothing."""
    await world.store.reserve_port("uid-other", Protocol.TCP, 22, FIRST_PORT)
    uid = world.add("web", spec(network={"forwards": [{"guestPort": 80, "hostPort": FIRST_PORT}]}))
    result = await world.step(uid)
    assert result.outcome is Outcome.TRANSIENT_ERROR
    assert world.last_actions == ["AllocatePorts"]
    assert world.store.transactions == 1
    assert batches(world, 1) == [["Scheduled", "ReconcileError"]]
    ready = next(c for c in world.status(uid).conditions if c.type == "Ready")
    assert (ready.reason, str(FIRST_PORT) in ready.message) == ("ReconcileError", True)
    await world.step(uid)
    assert world.store.transactions == 1


async def test_a_running_vm_looked_at_again_stores_nothing(world: World) -> None:
    uid = world.add("web")
    await world.settle(uid)
    transactions = world.store.transactions
    for _ in range(3):
        await world.step(uid)
    assert world.store.transactions == transactions


async def test_a_deletion_stores_the_stop_the_exit_and_the_removal(world: World) -> None:
    """The power button pass (Stopping, Stopped), the teardown pass that folds the exit in,
    Finalize (the store's own transaction, with `Deleted`); no status after it."""
    uid = world.add("web")
    await world.settle(uid)
    world.delete(uid)
    assert await pass_by_pass(world, uid, 3) == [Stored(1, 1, 1), Stored(1, 1, 1), Stored(0, 0, 1)]
    assert world.uid_gone(uid)
    assert batches(world, 2) == [["Stopping", "Stopped"], ["ExitDetected"]]
    assert world.events(uid)[-1] == "Deleted"
