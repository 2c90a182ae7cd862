"""The controller's status writer: group commit, change detection, and what each writer learns."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator

import pytest

from api.store import Database, StateStore, VMStore
from api.store.events import EventLog, NewEvent
from api.store.sql import Dialect, Transaction
from api.store.status_writer import StatusConflict, VMStatusWriter
from api.testing.tfstate import manifest, vm_state
from tests.component.test_store_states import write


async def declare(states: StateStore, vms: VMStore, count: int) -> list[str]:
    await write(states, vm_state(1, {f"vm-{n}": manifest(f"vm-{n}") for n in range(count)}))
    return [record.uid for record in await vms.list_records(project="lab")]


def count_transactions(db: Database, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    count = [0]
    real_write = db.write

    def counting_write(**options):  # type: ignore[no-untyped-def]
        count[0] += 1
        return real_write(**options)

    monkeypatch.setattr(db, "write", counting_write)
    return count


async def test_concurrent_writes_share_one_transaction(
    db: Database, states: StateStore, vms: VMStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes that arrive while one is committing go out together in the next transaction."""
    uids = await declare(states, vms, 20)
    writer = VMStatusWriter(db)
    transactions = count_transactions(db, monkeypatch)

    results = await asyncio.gather(*(writer.write_status(uid, {"phase": "Running"}) for uid in uids))

    assert results == [True] * 20
    records = {record.uid: record for record in await vms.list_records(project="lab")}
    assert all(records[uid].status == {"phase": "Running"} for uid in uids)
    versions = sorted(records[uid].resource_version for uid in uids)
    assert len(set(versions)) == 20, "every write gets its own resourceVersion"
    assert {uid: records[uid].resource_version for uid in uids} == writer.written_versions
    # The first writer commits alone; the 19 that queued behind it share a second commit.
    assert transactions == [2]


async def test_unchanged_status_is_not_written(db: Database, states: StateStore, vms: VMStore) -> None:
    [uid] = await declare(states, vms, 1)
    writer = VMStatusWriter(db)
    assert await writer.write_status(uid, {"phase": "Pending", "pid": None})
    version = writer.written_versions[uid]
    assert not await writer.write_status(uid, {"pid": None, "phase": "Pending"})
    [record] = await vms.list_records(project="lab")
    assert record.resource_version == version


async def test_a_vanished_vm_fails_only_its_own_write(db: Database, states: StateStore, vms: VMStore) -> None:
    uids = await declare(states, vms, 3)
    writer = VMStatusWriter(db)

    results = await asyncio.gather(
        *(writer.write_status(uid, {"phase": "Running"}) for uid in [*uids, "no-such-uid"]),
        return_exceptions=True,
    )

    assert results[:3] == [True, True, True]
    assert isinstance(results[3], StatusConflict)


async def test_a_failed_commit_reaches_every_writer_in_the_batch(
    db: Database, states: StateStore, vms: VMStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    uids = await declare(states, vms, 4)
    writer = VMStatusWriter(db)
    real_write = db.write

    def failing_write(**options):  # type: ignore[no-untyped-def]
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(db, "write", failing_write)
    results = await asyncio.gather(
        *(writer.write_status(uid, {"phase": "Running"}, started(uid)) for uid in uids),
        return_exceptions=True,
    )
    assert all(isinstance(result, sqlite3.OperationalError) for result in results)

    monkeypatch.setattr(db, "write", real_write)
    assert await writer.write_status(uids[0], {"phase": "Running"})
    assert "Started" not in [event.reason for event in await EventLog(db).list()], "none without its status"


def started(uid: str) -> list[NewEvent]:
    return [NewEvent(uid, "lab", "vm", "Started", f"{uid} started")]


async def test_a_cancelled_flush_hands_the_other_writes_on(
    db: Database, states: StateStore, vms: VMStore
) -> None:
    """Cancelling the writer that is committing loses nobody else's write, nor their events;
    the cancelled writer's events go with its status."""
    uids = await declare(states, vms, 3)
    writer = VMStatusWriter(db)
    async with db.write():  # hold the write lock so the first flush blocks inside it
        leader = asyncio.create_task(writer.write_status(uids[0], {"phase": "Running"}, started(uids[0])))
        await asyncio.sleep(0.01)
        followers = [
            asyncio.create_task(writer.write_status(uid, {"phase": "Running"}, started(uid)))
            for uid in uids[1:]
        ]
        await asyncio.sleep(0.01)
        leader.cancel()
    assert await asyncio.gather(*followers) == [True, True]
    with pytest.raises(asyncio.CancelledError):
        await leader
    records = {record.uid: record.status for record in await vms.list_records(project="lab")}
    assert records[uids[1]] == {"phase": "Running"}
    assert records[uids[2]] == {"phase": "Running"}
    assert records[uids[0]] is None, "the cancelled writer's own status is dropped, not written later"
    told = [event.message for event in await EventLog(db).list() if event.reason == "Started"]
    assert sorted(told) == sorted(f"{uid} started" for uid in uids[1:])


async def test_status_commits_skip_the_fsync_but_state_writes_keep_it(
    db: Database, states: StateStore, vms: VMStore
) -> None:
    """Status is recomputed from what runs; Terraform's state must survive power loss."""
    [uid] = await declare(states, vms, 1)
    seen: list[object] = []
    real_write = db.write
    setting, expected = {
        Dialect.SQLITE: ("PRAGMA synchronous", [1, 2]),  # NORMAL for the status batch, FULL for the state
        Dialect.POSTGRESQL: ("SHOW synchronous_commit", ["off", "on"]),
    }[db.dialect]

    @contextlib.asynccontextmanager
    async def spying_write(**options: bool) -> AsyncIterator[Transaction]:
        async with real_write(**options) as conn:
            seen.extend(row[0] for row in await conn.fetchall(setting))
            yield conn

    db.write = spying_write  # type: ignore[method-assign]
    await VMStatusWriter(db).write_status(uid, {"phase": "Running"})
    await write(states, vm_state(2, {"vm-0": manifest("vm-0")}))

    assert seen == expected
