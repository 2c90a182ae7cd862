"""Lease renewals on PostgreSQL run on a connection of their own, outside the write lock
(api/store/lease_renewal.py): under a burst of other writes a controller keeps its lease and
does not fence its own healthy VMs (docs/multi-host.md, "Fencing")."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from api.store import Database, open_store
from api.store.errors import StoreUnavailable
from api.store.postgres import WRITE_LOCK_KEY
from api.store.postgres_renewal import RenewalConnection
from api.testing.waiting import wait_until_async
from controller.fencing import fence_deadline
from tests.component.test_host_fencing import FakeQemus, agent
from tests.component.test_hosts_store import add_vm
from tests.postgres import PostgresCluster

LEASE = 10.0


@pytest.fixture
def url(postgres_cluster: PostgresCluster) -> str:
    return postgres_cluster.create_database()


@pytest.fixture
async def db(tmp_path: Path, url: str) -> AsyncIterator[Database]:
    database = await open_store(tmp_path / "data", database_url=url)
    yield database
    await database.close()


@contextlib.contextmanager
def write_lock_held_elsewhere(url: str) -> Iterator[None]:
    """Another process in the middle of a long write: it holds the store's write lock."""
    with psycopg.connect(url, autocommit=True) as other:
        other.execute(f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")
        yield
        other.execute("ROLLBACK")


async def renewed_at(db: Database) -> str:
    rows = await db.read("SELECT lease_renewed_at FROM hosts WHERE name = 'a'")
    return str(rows[0][0])


async def test_a_renewal_does_not_wait_for_other_writes(db: Database, tmp_path: Path, url: str) -> None:
    host = agent(tmp_path, db, FakeQemus([]), lease=LEASE)
    await host.register()
    before = await renewed_at(db)
    with write_lock_held_elsewhere(url):
        started = time.monotonic()
        assert await host.renew(within=LEASE)
        assert time.monotonic() - started < LEASE / 3
    assert await renewed_at(db) > before
    await host.close()


async def test_a_due_fence_kills_nothing_while_the_database_takes_the_renewal(
    db: Database, tmp_path: Path, url: str
) -> None:
    """The fence point passed (a renewal was late: a starved loop, a slow network) while other
    writes hold the write lock: the renewal the fence makes still reaches the database, so its
    answer, not the local timer, decides and nothing is killed."""
    qemus = FakeQemus(["vm1"])
    host = agent(tmp_path, db, qemus, lease=LEASE)
    await host.register()
    await add_vm(db, "vm1", host="a")
    # The fence's own clock, moved back to its deadline.
    sent = host._renewal_sent_at
    host._renewal_sent_at = sent - (fence_deadline(sent, LEASE) - sent)
    assert not host.may_spawn(), "the fence is due"
    with write_lock_held_elsewhere(url):
        fence = asyncio.create_task(host.fence_forever())
        try:
            await wait_until_async(host.may_spawn, within=LEASE, what="the renewal the fence made")
            assert qemus.killed == []
        finally:
            fence.cancel()
            await host.close()


async def test_the_renewal_connection_fences_and_comes_back(db: Database, tmp_path: Path, url: str) -> None:
    """A stale epoch is refused; a connection the server closed is StoreUnavailable once, then
    made again."""
    host = agent(tmp_path, db, FakeQemus([]), lease=LEASE)
    registered = await host.register()
    renewal = RenewalConnection(url)
    try:
        assert await renewal.renew("a", registered.epoch)
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("UPDATE hosts SET epoch = epoch + 1 WHERE name = 'a'")
            assert not await renewal.renew("a", registered.epoch)
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid != pg_backend_pid()"
                " AND query LIKE 'UPDATE hosts SET lease_renewed_at%'"
            )
        with pytest.raises(StoreUnavailable):
            await renewal.renew("a", registered.epoch + 1)
        assert await renewal.renew("a", registered.epoch + 1)
    finally:
        await renewal.close()
        await host.close()
