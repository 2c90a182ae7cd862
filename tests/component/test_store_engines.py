"""What the Database seam promises on both engines: two processes' writes serialised, other
processes' commits seen through `data_version`, and the database clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from api.store import Database, LockConflict, LockInfo, StateStore, open_store
from api.store.allocations import Allocations, PortTaken
from api.store.db import DATA_VERSION_RECHECK_SECONDS, SQLiteDatabase, open_database
from api.store.sql import Dialect, Row
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


async def test_a_quiet_write_wakes_no_subscriber(db: Database) -> None:
    """Usage records and the like: committed, and no watcher wakes for them."""
    heard: list[int] = []
    db.subscribe(lambda: heard.append(1))
    async with db.write(notify=False) as conn:
        await conn.execute(
            "INSERT INTO vm_usage_cursors (uid, pid, start_ticks, cpu_ticks, rss_bytes, sampled_at)"
            " VALUES ('u', 1, 2, 3, 4, '0')"
        )
    assert heard == []
    assert await db.read("SELECT uid FROM vm_usage_cursors") != []


async def test_status_writes_wake_only_subscribers_that_want_them(db: Database) -> None:
    """The scheduler and the controller's store watch subscribe with volatile=False: status and
    event writes (durable=False) do not wake them; every other commit does."""
    everything: list[int] = []
    durable_only: list[int] = []
    db.subscribe(lambda: everything.append(1))
    db.subscribe(lambda: durable_only.append(1), volatile=False)
    async with db.write(durable=False) as conn:
        await conn.execute(
            "INSERT INTO vm_usage_cursors (uid, pid, start_ticks, cpu_ticks, rss_bytes, sampled_at)"
            " VALUES ('u', 1, 2, 3, 4, '0')"
        )
    assert (everything, durable_only) == ([1], [])
    await StateStore(db).lock("lab", LockInfo.parse(b'{"ID": "a"}'))
    assert (everything, durable_only) == ([1, 1], [1])


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


@pytest.fixture
async def sqlite_pair(
    tmp_path: Path, clock: FakeClock
) -> AsyncIterator[tuple[SQLiteDatabase, SQLiteDatabase]]:
    """Two SQLite stores on one data dir, as `tofu-qemu api` and `tofu-qemu controller` open it."""
    first = await open_database(tmp_path / "sqlite", clock=clock)
    second = await open_database(tmp_path / "sqlite", clock=clock)
    yield first, second
    await second.close()
    await first.close()


async def test_sqlite_a_write_that_changed_no_row_wakes_no_subscriber(
    sqlite_pair: tuple[SQLiteDatabase, SQLiteDatabase],
) -> None:
    """PostgreSQL notifies every commit with `notify`; SQLite knows whether rows changed."""
    db, _ = sqlite_pair
    heard: list[int] = []
    db.subscribe(lambda: heard.append(1))
    async with db.write() as conn:
        await conn.fetchall("SELECT name FROM projects")
    assert heard == []
    await StateStore(db).lock("lab", LockInfo.parse(b'{"ID": "a"}'))
    assert heard == [1]


async def test_sqlite_data_version_asks_sqlite_only_when_the_wal_changed_or_every_recheck_period(
    sqlite_pair: tuple[SQLiteDatabase, SQLiteDatabase], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pollers ask every second; an unchanged WAL answers from a stat, and SQLite is asked
    again at least every DATA_VERSION_RECHECK_SECONDS. (PostgreSQL counts NOTIFYs: no query.)"""
    db, other = sqlite_pair
    assert DATA_VERSION_RECHECK_SECONDS == 10.0
    now = [1000.0]
    monkeypatch.setattr("api.store.db.time.monotonic", lambda: now[0])
    asked: list[str] = []
    read = db.read

    async def counting_read(query: str, params: Sequence[object] = ()) -> list[Row]:
        asked.append(query)
        return await read(query, params)

    monkeypatch.setattr(db, "read", counting_read)
    first = await db.data_version()
    assert await db.data_version() == first
    assert len(asked) == 1, "an unchanged WAL needs no query"
    await StateStore(other).lock("theirs", LockInfo.parse(b'{"ID": "b"}'))
    assert await db.data_version() != first, "the other process's commit changed the WAL"
    assert len(asked) == 2
    now[0] += DATA_VERSION_RECHECK_SECONDS - 0.1
    await db.data_version()
    assert len(asked) == 2
    now[0] += 0.2
    await db.data_version()
    assert len(asked) == 3, "asked again once the recheck period passed"
