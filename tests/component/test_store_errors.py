"""Errors a store call raises are the same kinds on both engines (api/store/sql.py): the callers'
`FAILURES`, `DatabaseError` and `IntegrityError` name no PostgreSQL driver class, so PostgreSQL's
errors must reach them wrapped (api/store/postgres.py `store_error`)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors
from psycopg_pool import PoolTimeout

from api.store import Database, StorageFull, StoreUnavailable
from api.store.errors import ConstraintViolation, DatabaseFailure, StoreError
from api.store.postgres import store_error
from api.store.sql import FAILURES, DatabaseError, IntegrityError


async def test_a_failed_read_is_a_database_error_callers_catch(db: Database) -> None:
    with pytest.raises(DatabaseError) as raised:
        await db.read("SELECT nothing FROM no_such_table")
    assert isinstance(raised.value, FAILURES)
    assert not isinstance(raised.value, psycopg.Error)


async def add_projects(db: Database, *names: str) -> None:
    async with db.write() as conn:
        for name in names:
            await conn.execute("INSERT INTO projects (name, created_at) VALUES (?, ?)", (name, "2026-01-01"))


async def test_a_duplicate_key_is_an_integrity_error_and_nothing_is_written(db: Database) -> None:
    await add_projects(db, "p")
    with pytest.raises(IntegrityError) as raised:
        await add_projects(db, "q", "p")
    assert not isinstance(raised.value, psycopg.Error)
    assert [row[0] for row in await db.read("SELECT name FROM projects ORDER BY name")] == ["p"]


async def fail_inside_a_write(db: Database, caught: list[Exception]) -> None:
    async with db.write() as conn:
        try:
            await conn.fetchall("SELECT nothing FROM no_such_table")
        except DatabaseError as err:
            caught.append(err)
            raise


async def test_a_failed_statement_inside_a_write_is_wrapped_there(db: Database) -> None:
    """What a store does inside its transaction sees the wrapped error too."""
    caught: list[Exception] = []
    with pytest.raises(DatabaseError):
        await fail_inside_a_write(db, caught)
    assert len(caught) == 1
    assert not isinstance(caught[0], psycopg.Error)


@pytest.mark.parametrize(
    ("driver_error", "store_type"),
    [
        (errors.DiskFull("no space left"), StorageFull),
        (psycopg.OperationalError("connection refused"), StoreUnavailable),
        (PoolTimeout("couldn't get a connection after 5.00 sec"), StoreUnavailable),
        (errors.UniqueViolation("duplicate key"), ConstraintViolation),
        (errors.ForeignKeyViolation("no such project"), ConstraintViolation),
        (errors.UndefinedTable("no such table"), DatabaseFailure),
        (errors.InsufficientPrivilege("permission denied for table vms"), DatabaseFailure),
    ],
)
def test_each_driver_error_maps_to_what_the_caller_can_do(
    driver_error: psycopg.Error, store_type: type[StoreError]
) -> None:
    assert type(store_error(driver_error)) is store_type
