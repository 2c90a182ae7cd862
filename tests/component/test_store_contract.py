"""The store contract (api/store/contracts.py): the same tests against the SQL store on both
engines (SQLite, PostgreSQL) and the in-memory fake.

A reconciler table test on the fake means something only if the fake behaves as the SQL store
does; these are the behaviours the controller relies on, including how many store transactions
a write costs (`Store.transactions`: the SQL store's commits, the fake's count).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from api.store import StateStore, VMStore, open_store
from api.store.allocations import Allocations
from api.store.contracts import AllocationLedger, EventSink, StatusStore
from api.store.events import EventLog
from api.store.memory import MemoryStore
from api.store.records import DiskHeld, DiskOwner, DiskRow, NewEvent, PortTaken, StatusConflict, VMRecord
from api.store.status_writer import VMStatusWriter
from api.testing.tfstate import vm_state
from api.types import Protocol, ReclaimPolicy
from tests.component.conftest import FakeClock
from tests.component.test_store_states import write
from tests.postgres import PostgresCluster

TCP = Protocol.TCP


@dataclass
class Store:
    """One implementation under test, and the API's side of it (declare, delete, read events)."""

    objects: StatusStore
    ledger: AllocationLedger
    events: EventSink
    sql: tuple[StateStore, VMStore, EventLog] | None = None
    memory: MemoryStore | None = None
    serial: int = 1
    # Commits of the SQL store (every write transaction of this process, the API's included).
    commits: int = 0

    @property
    def transactions(self) -> int:
        return self.memory.transactions if self.memory is not None else self.commits

    def count_commit(self) -> None:
        self.commits += 1

    async def declare(self, *names: str) -> dict[str, str]:
        """The VMs `names` exist (and no other); returns name -> uid."""
        if self.memory is not None:
            known = {
                record.name: uid
                for uid in await self.memory.versions()
                if (record := await self.memory.get(uid))
            }
            for name in names:
                if name not in known:
                    self.memory.put(_record(f"uid-{name}", name))
            for name, uid in known.items():
                if name not in names:
                    self.memory.delete(uid)
            return {name: f"uid-{name}" for name in names}
        assert self.sql is not None
        states, vms, _ = self.sql
        await write(states, vm_state(self.serial, {name: {} for name in names}))
        self.serial += 1
        return {r.name: r.uid for r in await vms.list_records(project="lab") if r.deleted_at is None}

    async def reasons(self, uid: str) -> list[str]:
        if self.memory is not None:
            return [event.reason for event in self.memory.events if event.uid == uid]
        assert self.sql is not None
        return [event.reason for event in await self.sql[2].list(uid=uid)]


def _record(uid: str, name: str) -> VMRecord:
    now = datetime(2026, 11, 21, tzinfo=UTC)
    return VMRecord(
        uid, "lab", name, 1, {}, None, {}, f"terraform_data.vm[{name!r}]", now, now, None, 1, None, 0
    )


@pytest.fixture(params=["sqlite", "postgres", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    """The SQL store on each engine (PostgreSQL: a fresh database of the session's cluster),
    and the fake."""
    if request.param == "memory":
        fake = MemoryStore()
        yield Store(fake, fake, fake, memory=fake)
        return
    database_url: str | None = None
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        database_url = cluster.create_database()
    db = await open_store(tmp_path / "data", database_url=database_url, clock=clock)
    try:
        events = EventLog(db)
        sql = Store(VMStatusWriter(db), Allocations(db), events, sql=(StateStore(db), VMStore(db), events))
        db.subscribe(sql.count_commit)
        yield sql
    finally:
        await db.close()


async def test_get_reads_an_object_and_none_for_an_unknown_uid(store: Store) -> None:
    uids = await store.declare("web")
    record = await store.objects.get(uids["web"])
    assert record is not None
    assert (record.name, record.project, record.deleted_at) == ("web", "lab", None)
    assert await store.objects.get("no-such-uid") is None
    assert set(await store.objects.versions()) == {uids["web"]}


async def test_status_is_written_once_and_an_unchanged_status_is_not(store: Store) -> None:
    uid = (await store.declare("web"))["web"]
    before = (await store.objects.versions())[uid]
    assert await store.objects.write_status(uid, {"phase": "Running", "pid": 7})
    assert not await store.objects.write_status(uid, {"pid": 7, "phase": "Running"})
    record = await store.objects.get(uid)
    assert record is not None
    assert record.status == {"phase": "Running", "pid": 7}
    assert record.resource_version > before


async def test_writing_the_status_of_a_gone_object_is_a_conflict_and_stores_no_event(store: Store) -> None:
    gone = NewEvent("no-such-uid", "lab", "gone", "Started", "QEMU started")
    with pytest.raises(StatusConflict):
        await store.objects.write_status("no-such-uid", {"phase": "Running"}, [gone])
    assert await store.reasons("no-such-uid") == [], "nothing of a gone object is stored"


async def test_a_status_and_its_events_are_one_transaction_changed_or_not(store: Store) -> None:
    uid = (await store.declare("web"))["web"]
    told = [NewEvent(uid, "lab", "web", reason, "m") for reason in ("Scheduled", "PortsAllocated", "Started")]
    before = store.transactions
    assert await store.objects.write_status(uid, {"phase": "Starting"}, told)
    assert store.transactions == before + 1
    killing = NewEvent(uid, "lab", "web", "Killing", "SIGKILL sent")
    assert not await store.objects.write_status(uid, {"phase": "Starting"}, [killing])
    assert store.transactions == before + 2, "unchanged status: its events are stored all the same"
    assert (await store.reasons(uid))[-4:] == ["Scheduled", "PortsAllocated", "Started", "Killing"]


async def test_a_status_replaced_before_its_flush_keeps_its_events(store: Store) -> None:
    """Writes for one VM racing one batch: the newest status wins and no event is lost."""
    uid = (await store.declare("web"))["web"]
    reasons = ["Stopping", "Killing", "Stopped"]
    written = await asyncio.gather(
        *(
            store.objects.write_status(uid, {"phase": reason}, [NewEvent(uid, "lab", "web", reason, "m")])
            for reason in reasons
        )
    )
    record = await store.objects.get(uid)
    assert record is not None
    assert record.status == {"phase": "Stopped"}
    assert written[-1] is True
    assert (await store.reasons(uid))[-3:] == reasons


async def test_finalize_removes_only_a_deleting_object_and_tells_it(store: Store) -> None:
    uid = (await store.declare("web"))["web"]
    await store.objects.finalize(uid)
    assert await store.objects.get(uid) is not None, "an object not being deleted stays"
    await store.declare()
    record = await store.objects.get(uid)
    assert record is not None
    assert record.deleted_at is not None
    await store.objects.finalize(uid)
    await store.objects.finalize(uid)
    assert await store.objects.get(uid) is None
    assert (await store.reasons(uid)).count("Deleted") == 1


async def test_ports_are_reserved_idempotently_and_never_twice(store: Store) -> None:
    assert await store.ledger.reserve_port("a", TCP, 22, 20022) == 20022
    assert await store.ledger.reserve_port("a", TCP, 22, 20023) == 20022, "a retry keeps its port"
    with pytest.raises(PortTaken):
        await store.ledger.reserve_port("b", TCP, 80, 20022)
    assert await store.ledger.reserve_port("b", Protocol.UDP, 53, 20022) == 20022, "per protocol"
    ports, disks = await store.ledger.held_by("a")
    assert [(p.protocol, p.guest_port, p.host_port) for p in ports] == [(TCP, 22, 20022)]
    assert disks == []
    await store.ledger.release_ports("a", [(TCP, 22), (TCP, 9999)])
    assert await store.ledger.held_by("a") == ([], [])
    assert [p.uid for p in await store.ledger.ports()] == ["b"]


async def test_disks_are_recorded_updated_and_forgotten(store: Store) -> None:
    row = DiskRow("a", "root", "/d/a/root.qcow2", ReclaimPolicy.DELETE, 100, None, DiskOwner("lab", "web"))
    await store.ledger.record_disk("a", row)
    await store.ledger.record_disk("a", DiskRow("a", "root", "/d/a/root.qcow2", ReclaimPolicy.RETAIN, 200))
    await store.ledger.set_disk_size("a", "root", 300)
    (held,) = (await store.ledger.held_by("a"))[1]
    assert (held.reclaim_policy, held.size_mib, held.owner) == (
        ReclaimPolicy.RETAIN,
        300,
        DiskOwner("lab", "web"),
    )
    assert [d.name for d in await store.ledger.disks()] == ["root"]
    await store.ledger.forget_disk("a", "root")
    await store.ledger.forget_disk("a", "root")
    assert await store.ledger.disks() == []


async def test_a_retained_disk_goes_to_a_new_vm_of_the_same_name_once_the_old_one_is_gone(
    store: Store,
) -> None:
    old = (await store.declare("web"))["web"]
    owner = DiskOwner("lab", "web")
    await store.ledger.record_disk(
        old, DiskRow(old, "data", "/d/old/data.qcow2", ReclaimPolicy.RETAIN, 64, None, owner)
    )
    await store.declare()
    with pytest.raises(DiskHeld):
        await store.ledger.adopt_retained_disk("new", owner, "data")
    await store.objects.finalize(old)
    assert [d.uid for d in await store.ledger.retained_disks()] == [old]
    adopted = await store.ledger.adopt_retained_disk("new", owner, "data")
    assert adopted is not None
    assert (adopted.uid, adopted.path) == ("new", "/d/old/data.qcow2")
    assert await store.ledger.adopt_retained_disk("other", DiskOwner("lab", "db"), "data") is None
    assert [(d.uid, d.name) for d in await store.ledger.disks()] == [("new", "data")]


async def test_events_are_recorded_in_order(store: Store) -> None:
    uid = (await store.declare("web"))["web"]
    await store.events.record(
        NewEvent(uid, "lab", "web", "Started", "one"), NewEvent(uid, "lab", "web", "Stopping", "two")
    )
    assert (await store.reasons(uid))[-2:] == ["Started", "Stopping"]
