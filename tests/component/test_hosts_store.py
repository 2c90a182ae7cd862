"""The hosts and leases tables on both engines: registration and epochs, lease renewal with the
database's clock, cordon, drain, placement writes, legacy adoption, and the scheduler lease."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest

from api.hosts import Resources
from api.store import Database, NotFound
from api.store.allocations import Allocations
from api.store.hosts import Hosts, Leases, Registration
from api.store.status_writer import VMStatusWriter
from api.types import Protocol
from tests.component.conftest import FakeClock

CAPACITY = Resources(cpus=4, memory_mib=8192, ports=100)


def registration(name: str, *, lease: float = 15.0, labels: dict[str, str] | None = None) -> Registration:
    return Registration(name=name, labels=labels or {}, capacity=CAPACITY, lease_seconds=lease)


async def add_vm(db: Database, uid: str, *, host: str | None = None, spec: dict[str, object] | None = None,
                 spec_error: str | None = None, status: str | None = None) -> None:  # fmt: skip
    now = db.clock().isoformat()
    async with db.write() as conn:
        await conn.execute(
            "INSERT INTO vms (uid, project, name, generation, spec_hash, spec, spec_error, labels, address,"
            " created_at, spec_changed_at, state_serial, resource_version, host, status)"
            " VALUES (?, 'p', ?, 1, 'h', ?, ?, '{}', 'a', ?, ?, 1, 0, ?, ?)",
            (uid, uid, json.dumps(spec or {"memory": 256, "cpus": 1}), spec_error, now, now, host, status),
        )


async def test_registering_again_keeps_the_cordon_and_takes_the_next_epoch(db: Database) -> None:
    hosts = Hosts(db)
    first = await hosts.register(registration("a", labels={"zone": "x"}))
    assert (first.epoch, first.cordoned, dict(first.labels), first.capacity) == (
        1,
        False,
        {"zone": "x"},
        CAPACITY,
    )
    await hosts.set_cordoned("a", True)
    again = await hosts.register(registration("a"))
    assert (again.epoch, again.cordoned, dict(again.labels)) == (2, True, {})


async def test_a_host_is_ready_until_its_lease_runs_out(db: Database) -> None:
    hosts = Hosts(db)
    host = await hosts.register(registration("a", lease=15.0))
    renewed = host.lease_renewed_at
    assert host.ready(renewed + timedelta(seconds=14.9))
    assert not host.ready(renewed + timedelta(seconds=15))
    assert await hosts.renew("a", host.epoch)
    (after,) = await hosts.all()
    assert after.lease_renewed_at >= renewed
    assert not await hosts.renew("missing", 1)
    # A renewal at an older epoch is refused: the host registered again since (fencing).
    await hosts.register(registration("a", lease=15.0))
    assert not await hosts.renew("a", host.epoch)


async def test_lease_times_are_the_database_clock(db: Database, clock: FakeClock) -> None:
    """On SQLite the store clock is the database's; on PostgreSQL it is now() of the server, so a
    controller whose own clock is far off still stamps true times."""
    clock.advance(-86400 * 365)  # the process clock is a year behind the world
    host = await Hosts(db).register(registration("a"))
    if db.dialect == "sqlite":
        assert host.lease_renewed_at == clock()
    else:
        assert abs((datetime.now(UTC) - host.lease_renewed_at).total_seconds()) < 60


async def test_cordon_of_an_unknown_host_is_not_found(db: Database) -> None:
    with pytest.raises(NotFound, match="no host named 'nope'"):
        await Hosts(db).set_cordoned("nope", True)


async def test_drain_cordons_and_unplaces_only_the_vms_without_retained_disks(db: Database) -> None:
    hosts = Hosts(db)
    await hosts.register(registration("a"))
    await add_vm(db, "plain", host="a")
    await add_vm(db, "scratch", host="a", spec={"disks": [{"name": "d", "reclaimPolicy": "Delete"}]})
    await add_vm(db, "keeper", host="a", spec={"disks": [{"name": "d", "reclaimPolicy": "Retain"}]})
    await add_vm(db, "elsewhere", host="b")
    moved, kept = await hosts.drain("a")
    assert (moved, kept) == (["plain", "scratch"], ["keeper"])
    placed = {vm.uid: (vm.host, vm.scheduling) for vm in await hosts.placed()}
    assert placed == {
        "plain": (None, "drained from host a"),
        "scratch": (None, "drained from host a"),
        "keeper": ("a", None),
        "elsewhere": ("b", None),
    }
    assert (await hosts.all())[0].cordoned


async def test_place_writes_only_unplaced_vms_with_a_new_resource_version(db: Database) -> None:
    hosts = Hosts(db)
    await add_vm(db, "new")
    await add_vm(db, "taken", host="b")
    await add_vm(db, "stuck")
    before = await VMStatusWriter(db).versions()
    placed = await hosts.place({"new": "a", "taken": "a"}, {"stuck": "no host fits"})
    assert placed == ["new"]
    after = await VMStatusWriter(db).versions()
    assert after["new"] > before["new"]
    assert after["stuck"] > before["stuck"]
    assert after["taken"] == before["taken"]
    # The same note again writes nothing.
    await hosts.place({}, {"stuck": "no host fits"})
    assert (await VMStatusWriter(db).versions())["stuck"] == after["stuck"]


async def test_a_host_sees_its_vms_and_the_unplaced_ones_that_need_no_host(db: Database) -> None:
    await add_vm(db, "mine", host="a")
    await add_vm(db, "theirs", host="b")
    await add_vm(db, "waiting")
    await add_vm(db, "invalid", spec_error="bad")
    writer = VMStatusWriter(db, host="a")
    assert set(await writer.versions()) == {"mine", "invalid"}
    assert await writer.get("theirs") is None
    assert (await writer.get("mine")) is not None
    assert set(await VMStatusWriter(db).versions()) == {"mine", "theirs", "waiting", "invalid"}


async def test_ports_are_held_per_host(db: Database) -> None:
    on_a, on_b = Allocations(db, host="a"), Allocations(db, host="b")
    assert await on_a.reserve_port("vm1", Protocol.TCP, 22, 20000) == 20000
    assert await on_b.reserve_port("vm2", Protocol.TCP, 22, 20000) == 20000
    assert [row.uid for row in await on_a.ports()] == ["vm1"]
    assert await on_b.held_by("vm1") == ([], [])


async def test_the_only_host_adopts_what_was_stored_before_hosts(db: Database) -> None:
    legacy = Allocations(db)
    await legacy.reserve_port("old", Protocol.TCP, 22, 20001)
    await add_vm(db, "old", status='{"phase": "Running"}')
    await add_vm(db, "fresh")
    hosts = Hosts(db)
    await hosts.register(registration("a"))
    assert await hosts.adopt_legacy("a")
    placed = {vm.uid: vm.host for vm in await hosts.placed()}
    assert placed == {"old": "a", "fresh": None}
    assert [row.uid for row in await Allocations(db, host="a").ports()] == ["old"]
    await hosts.register(registration("b"))
    assert not await hosts.adopt_legacy("b")


async def test_one_scheduler_holds_the_lease_until_it_expires(db: Database, clock: FakeClock) -> None:
    leases = Leases(db)
    assert await leases.hold("scheduler", "a", 0.2)
    assert not await leases.hold("scheduler", "b", 0.2)
    assert await leases.hold("scheduler", "a", 0.2)
    assert await leases.holder("scheduler") == "a"
    if db.dialect == "sqlite":
        clock.advance(0.3)
    else:
        await asyncio.sleep(0.3)
    assert await leases.hold("scheduler", "b", 0.2)
    assert await leases.holder("scheduler") == "b"


async def test_a_thousand_vms_are_placed_in_one_batch_with_an_event_each(db: Database) -> None:
    now = db.clock().isoformat()
    uids = [f"vm{i:04}" for i in range(1000)]
    async with db.write() as conn:
        await conn.executemany(
            "INSERT INTO vms (uid, project, name, generation, spec_hash, spec, labels, address,"
            " created_at, spec_changed_at, state_serial, resource_version)"
            " VALUES (?, 'p', ?, 1, 'h', '{}', '{}', 'a', ?, ?, 1, 0)",
            [(uid, uid, now, now) for uid in uids],
        )
    placed = await Hosts(db).place({uid: "a" for uid in uids}, {})
    assert placed == uids
    versions = await VMStatusWriter(db).versions()
    assert sorted(versions.values()) == list(range(1, 1001))
    rows = await db.read("SELECT COUNT(*) FROM events WHERE reason = 'Scheduled'")
    assert rows[0][0] == 1000
