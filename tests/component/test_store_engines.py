"""What the Database seam promises on both engines: two processes' writes serialised, other
processes' commits seen through `data_version`, and the database clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from api.store import Database, LockConflict, LockInfo, StateStore, open_store
from api.store.allocations import Allocations, PortTaken
from api.store.sql import Dialect
from api.types import Protocol
from tests.component.conftest import FakeClock

CHANGE_SEEN_WITHIN_SECONDS = 5.0
RACES = 10


@pytest.fixture
async def other(
    tmp_path: Path, clock: FakeClock, database_url: str | None, db: Database
) -> AsyncIterator[Database]:
    """A second store on the same database, as another tofu-qemu process opens it."""
    second = await open_store(tmp_path / "data", database_url=database_url, clock=clock)
    yield second
    await second.close()


async def test_two_processes_locking_one_state_at_once_one_wins(db: Database, other: Database) -> None:
    """The read-then-write of LOCK runs alone: never two holders. (Each project row exists first,
    so no unique index serialises the racers by chance; ten races make a lucky pass unlikely.)"""
    projects = [f"p{number}" for number in range(RACES)]
    for project in projects:
        await StateStore(db).lock(project, LockInfo.parse(b'{"ID": "first"}'))
        await StateStore(db).unlock(project, "first")
    attempts = [
        StateStore(store).lock(project, LockInfo.parse(f'{{"ID": "{index}-{side}"}}'.encode()))
        for project in projects
        for index in range(3)
        for side, store in enumerate((db, other))
    ]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    assert all(result is None or isinstance(result, LockConflict) for result in results), results
    holders = {project: (await StateStore(db).project(project)).lock for project in projects}
    assert all(holder is not None for holder in holders.values())
    assert results.count(None) == RACES, "exactly one winner per project"


async def test_two_processes_reserving_one_port_at_once_one_gets_it(db: Database, other: Database) -> None:
    reservations = [
        Allocations(store).reserve_port(f"vm-{index}-{side}", Protocol.TCP, 80, 20_000)
        for index in range(4)
        for side, store in enumerate((db, other))
    ]
    results = await asyncio.gather(*reservations, return_exceptions=True)
    assert results.count(20_000) == 1
    assert all(isinstance(result, PortTaken) for result in results if result != 20_000)


async def test_data_version_changes_when_another_process_commits(db: Database, other: Database) -> None:
    before = await db.data_version()
    await StateStore(other).lock("theirs", LockInfo.parse(b'{"ID": "b"}'))
    deadline = asyncio.get_running_loop().time() + CHANGE_SEEN_WITHIN_SECONDS
    while await db.data_version() == before:
        assert asyncio.get_running_loop().time() < deadline, "the other process's commit was not seen"
        await asyncio.sleep(0.01)


async def test_subscribers_hear_this_process_commits(db: Database) -> None:
    heard: list[int] = []
    db.subscribe(lambda: heard.append(1))
    await StateStore(db).lock("lab", LockInfo.parse(b'{"ID": "a"}'))
    assert heard == [1]


async def test_database_now_is_the_database_clock(db: Database, clock: FakeClock) -> None:
    """SQLite: the store clock (one machine). PostgreSQL: the server's now(), which hosts share."""
    now = await db.database_now()
    if db.dialect is Dialect.SQLITE:
        assert now == clock()
    else:
        assert abs(now - datetime.now(UTC)) < timedelta(seconds=30)


async def test_a_write_waits_while_another_process_holds_the_write_lock(
    db: Database, hold_write_lock: Callable[[], Callable[[], None]]
) -> None:
    """What makes every read-then-write safe across processes: SQLite's BEGIN IMMEDIATE, and
    PostgreSQL's write advisory lock, taken before the transaction's first statement."""
    release = hold_write_lock()
    writing = asyncio.create_task(StateStore(db).lock("lab", LockInfo.parse(b'{"ID": "a"}')))
    await asyncio.sleep(0.3)
    assert not writing.done(), "the write went ahead while another process held the lock"
    release()
    async with asyncio.timeout(5):
        await writing
