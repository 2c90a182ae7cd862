"""The scheduler on both engines: a pass places unplaced VMs with a Scheduled event, notes why
the others wait, and the running loop places a VM written after it started; host metrics."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from api.hosts import Host, PlacedVM, Resources
from api.store import Database
from api.store.allocations import Allocations
from api.store.events import EventLog
from api.store.hosts import Hosts, Registration
from api.store.vms import VMStore
from api.types import Protocol
from controller.host_agent import HostAgent, HostMetrics, Scheduler
from controller.settings import ControllerSettings
from tests.component.conftest import FakeClock
from tests.component.test_hosts_store import add_vm

WAIT_SECONDS = 10.0


async def two_hosts(db: Database) -> Hosts:
    hosts = Hosts(db)
    for name, labels in (("a", {"zone": "x"}), ("b", {})):
        await hosts.register(Registration(name, labels, Resources(2, 4096, 10), lease_seconds=15.0))
    return hosts


async def test_a_pass_places_spreads_and_records_scheduled(db: Database) -> None:
    hosts = await two_hosts(db)
    for uid in ("vm1", "vm2"):
        await add_vm(db, uid)
    await add_vm(db, "picky", spec={"memory": 256, "nodeSelector": {"zone": "y"}})
    events = EventLog(db)
    scheduler = Scheduler(db, holder="a", lease_seconds=15.0)
    assert await scheduler.schedule_once() == 2
    placed = {vm.uid: vm.host for vm in await hosts.placed()}
    assert placed == {"vm1": "a", "vm2": "b", "picky": None}
    recorded = [(event.reason, event.message) for event in await events.list(uid="vm1")]
    assert recorded == [("Scheduled", "placed on host a")]
    (picky,) = [vm for vm in await VMStore(db).list_records() if vm.uid == "picky"]
    conditions = {c.type: c for c in picky.to_object().status.conditions}
    assert conditions["Scheduled"].message == (
        "no host fits 256 MiB, 1 vCPU(s), 0 port(s), nodeSelector zone=y:"
        " a: no label zone=y; b: no label zone=y"
    )
    assert await scheduler.schedule_once() == 0


async def test_the_running_scheduler_places_a_vm_written_later(db: Database) -> None:
    hosts = await two_hosts(db)
    scheduler = Scheduler(db, holder="a", lease_seconds=15.0)
    committed = asyncio.Event()
    db.subscribe(committed.set)
    task = asyncio.create_task(scheduler.run_forever())
    try:
        await asyncio.sleep(0.1)
        await add_vm(db, "late")
        async with asyncio.timeout(WAIT_SECONDS):
            while True:
                committed.clear()
                if (await hosts.placed())[0].host is not None:
                    break
                await committed.wait()
    finally:
        task.cancel()


async def test_a_second_scheduler_does_nothing_while_the_first_holds_the_lease(db: Database) -> None:
    hosts = await two_hosts(db)
    first = Scheduler(db, holder="a", lease_seconds=15.0)
    second = Scheduler(db, holder="b", lease_seconds=15.0)
    running = [asyncio.create_task(first.run_forever())]
    await asyncio.sleep(0.2)
    running[0].cancel()
    # "a" no longer runs, but its lease has 15 s left: "b" must not place anything meanwhile.
    running.append(asyncio.create_task(second.run_forever()))
    try:
        await add_vm(db, "waiting")
        await asyncio.sleep(1.5)
        assert (await hosts.placed())[0].host is None
    finally:
        running[1].cancel()


async def test_host_metrics_count_ready_hosts_and_lease_ages(db: Database) -> None:
    hosts = await two_hosts(db)
    registry = CollectorRegistry()
    metrics = HostMetrics(registry)
    listed = await hosts.all()
    now = listed[0].lease_renewed_at + timedelta(seconds=16)
    metrics.update([listed[0]], listed[0].lease_renewed_at + timedelta(seconds=1))
    metrics.update(listed, now)
    assert registry.get_sample_value("tofu_qemu_hosts", {"ready": "false"}) == 2
    assert registry.get_sample_value("tofu_qemu_hosts", {"ready": "true"}) == 0
    age = registry.get_sample_value("tofu_qemu_host_lease_age_seconds", {"host": "a"})
    assert age is not None
    assert age >= 16
    capacity = {
        resource: registry.get_sample_value("tofu_qemu_host_capacity", {"host": "b", "resource": resource})
        for resource in ("cpus", "memory_mib", "ports")
    }
    assert capacity == {"cpus": 2, "memory_mib": 4096, "ports": 10}


async def test_vms_of_a_lost_host_get_host_ready_false_once_and_it_clears(
    db: Database, clock: FakeClock
) -> None:
    """Lost = lease run out for longer than host_lost_grace_seconds (database clock); nothing moves."""
    hosts = Hosts(db)
    await hosts.register(Registration("a", {}, Resources(2, 4096, 10), lease_seconds=0.2))
    await add_vm(db, "vm1", host="a")
    events = EventLog(db)
    scheduler = Scheduler(db, holder="a", lease_seconds=15.0, lost_grace=timedelta(seconds=0.2))
    await scheduler.schedule_once()
    assert [vm.scheduling for vm in await hosts.placed()] == [None]
    if db.dialect == "sqlite":
        clock.advance(0.5)
    else:
        await asyncio.sleep(0.5)
    await scheduler.schedule_once()
    await scheduler.schedule_once()
    (vm,) = await VMStore(db).list_records()
    (condition,) = [c for c in vm.to_object().status.conditions if c.type == "HostReady"]
    assert (condition.status, condition.reason) == ("False", "HostLost")
    assert condition.message.startswith("host a lost: no lease renewal since ")
    assert vm.host == "a"
    assert [(e.reason, e.type) for e in await events.list(uid="vm1")] == [("HostLost", "Warning")]
    # The controller comes back (a registration renews the lease; a long one, for a slow machine).
    await hosts.register(Registration("a", {}, Resources(2, 4096, 10), lease_seconds=15.0))
    await scheduler.schedule_once()
    assert [vm.scheduling for vm in await hosts.placed()] == [None]


async def test_a_pass_at_a_commit_reads_no_host_unless_a_vm_waits_and_lost_hosts_wait_for_their_look(
    db: Database, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Most commits are status writes: such a pass is one index probe. Lost hosts are looked
    for by the pass that run_forever makes every lease / 3 (`look_for_lost`)."""
    hosts = Hosts(db)
    await hosts.register(Registration("a", {}, Resources(2, 4096, 10), lease_seconds=0.2))
    await add_vm(db, "vm1", host="a")
    scheduler = Scheduler(db, holder="a", lease_seconds=15.0, lost_grace=timedelta(seconds=0.2))
    reads: list[int] = []
    read_hosts = Hosts.all

    async def counted(self: Hosts) -> list[Host]:
        reads.append(1)
        return await read_hosts(self)

    monkeypatch.setattr(Hosts, "all", counted)
    if db.dialect == "sqlite":
        clock.advance(0.5)
    else:
        await asyncio.sleep(0.5)
    assert await scheduler.schedule_once(look_for_lost=False) == 0
    assert (len(reads), [vm.scheduling for vm in await hosts.placed()]) == (0, [None])
    await scheduler.schedule_once()
    assert len(reads) == 1
    assert [vm.scheduling is not None for vm in await hosts.placed()] == [True]
    await add_vm(db, "vm2")
    assert await scheduler.schedule_once(look_for_lost=False) == 0, "the only host is lost"
    assert len(reads) == 2, "a VM waits for a host: the pass reads them"


async def test_a_vm_no_host_fits_is_not_placed_again_until_something_changes(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiting VM makes every commit a pass; while neither the VMs nor the hosts change, the
    pass stops after one aggregate read instead of reading and decoding every VM again."""
    hosts = await two_hosts(db)
    await add_vm(db, "big", spec={"memory": 65536})
    scheduler = Scheduler(db, holder="a", lease_seconds=15.0)
    reads: list[int] = []
    read_placed = Hosts.placed

    async def counted(self: Hosts) -> list[PlacedVM]:
        reads.append(1)
        return await read_placed(self)

    monkeypatch.setattr(Hosts, "placed", counted)
    for _ in range(3):
        assert await scheduler.schedule_once(look_for_lost=False) == 0
    assert len(reads) == 2, "one pass notes Scheduled=False, one more finds nothing new, then none"
    await add_vm(db, "small")
    assert await scheduler.schedule_once(look_for_lost=False) == 1
    assert len(reads) == 3, "a new VM is read"
    await hosts.register(Registration("c", {}, Resources(2, 131072, 10), lease_seconds=15.0))
    assert await scheduler.schedule_once(look_for_lost=False) == 1, "a new host with room places it"
    assert {vm.uid: vm.host for vm in await hosts.placed()}["big"] == "c"


async def test_on_sqlite_a_renamed_machine_keeps_its_vms(db: Database, tmp_path: Path) -> None:
    """A container re-created with a new hostname is the same machine on SQLite; on PostgreSQL
    another name is another host, whose VMs stay where they are."""
    hosts = Hosts(db)
    await hosts.register(Registration("old-name", {}, Resources(2, 4096, 10), lease_seconds=15.0))
    await add_vm(db, "vm1", host="old-name")
    await Allocations(db, host="old-name").reserve_port("vm1", Protocol.TCP, 22, 20000)
    settings = ControllerSettings(data_dir=tmp_path, host_name="new-name")
    await HostAgent(settings, db, HostMetrics(CollectorRegistry())).register()
    placed = {vm.uid: vm.host for vm in await hosts.placed()}
    names = [host.name for host in await hosts.all()]
    held = [row.uid for row in await Allocations(db, host="new-name").ports()]
    if db.dialect == "sqlite":
        assert (placed, names, held) == ({"vm1": "new-name"}, ["new-name"], ["vm1"])
    else:
        assert (placed, names, held) == ({"vm1": "old-name"}, ["new-name", "old-name"], [])
