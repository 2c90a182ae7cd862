"""The seam between the stores and the SQL engine: what every store module needs from a database.

Two implementations: SQLite (api/store/db.py, the embedded default) and PostgreSQL
(api/store/postgres.py, `--database-url postgresql://...`). The stores' SQL is written once, in
a form both engines accept:
- placeholders are `?`, one per parameter, in order (no `?NNN`, no named ones); PostgreSQL's
  driver gets them as `%s` (`to_format_placeholders`);
- conflicts are `INSERT ... ON CONFLICT (...) DO NOTHING / DO UPDATE` (never INSERT OR IGNORE
  or OR REPLACE), new ids come back with `RETURNING`, null-safe comparison is `IS DISTINCT FROM`,
  and constant conditions are `TRUE`;
- timestamps are ISO 8601 text written by the store clock, so they compare as text on both;
- the few queries only one engine can say (JSON in SQL, for metrics) pick by `Database.dialect`.

Write transactions are serialised, as SQLite's BEGIN IMMEDIATE serialises them, so every
read-then-write inside one sees no concurrent writer. PostgreSQL does it with one transaction-
scoped advisory lock (api/store/postgres.py says why one lock and not finer ones, for now).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, overload

from api.store.errors import ConstraintViolation, DatabaseFailure, StoreError

Clock = Callable[[], datetime]
# Errors a query may raise on either engine: what callers that log and carry on catch.
# PostgreSQL's driver errors reach callers wrapped (api/store/postgres.py), so that a process on
# SQLite never imports the driver.
DatabaseError = (sqlite3.Error, DatabaseFailure)
# What a caller that logs a failed store call and carries on catches: either engine's errors and
# the store's own (StorageFull, StoreUnavailable, ...).
FAILURES = (sqlite3.Error, StoreError)
# A UNIQUE or PRIMARY KEY constraint refused the write.
IntegrityError = (sqlite3.IntegrityError, ConstraintViolation)


def utc_now() -> datetime:
    return datetime.now(UTC)


class Dialect(StrEnum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


class Row(Protocol):
    """A result row, by position or by column name (sqlite3.Row is one)."""

    @overload
    def __getitem__(self, key: int | str, /) -> Any: ...
    @overload
    def __getitem__(self, key: slice, /) -> tuple[Any, ...]: ...
    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...
    def keys(self) -> list[str]: ...


class Transaction(Protocol):
    """The statements of one write transaction; it commits when the `write()` block ends."""

    async def execute(self, query: str, params: Sequence[object] = ()) -> int:
        """Run one statement; returns how many rows it changed."""

    async def executemany(self, query: str, rows: Sequence[Sequence[object]]) -> None: ...

    async def fetchall(self, query: str, params: Sequence[object] = ()) -> list[Row]: ...

    async def fetchone(self, query: str, params: Sequence[object] = ()) -> Row | None: ...


class Database(Protocol):
    """A migrated store: reads, serialised write transactions, the clocks and change feeds."""

    clock: Clock
    dialect: Dialect

    def subscribe(self, callback: Callable[[], None], *, volatile: bool = True) -> None:
        """Call `callback` after committed writes of this process: those with `notify`, and in
        SQLite only those that changed a row. `volatile=False`: not after `durable=False` ones
        (VM status and events, recomputed from what runs), which change no spec, placement or
        ledger: for the scheduler and the controller's store watch, which a converge's status
        writes would otherwise wake dozens of times per VM."""

    async def data_version(self) -> int:
        """A number that changes when another process commits (poll it to see their writes);
        it may change for this process's own commits too."""

    async def read(self, query: str, params: Sequence[object] = ()) -> list[Row]:
        """Run one read-only statement to completion; it sees only committed data."""

    def write(self, *, durable: bool = True, notify: bool = True) -> AbstractAsyncContextManager[Transaction]:
        """One write transaction, serialised with every other writer; commit on success.

        `durable=False`: the commit may be lost with the machine (never with the process);
        only for data recomputed anyway, such as VM status and events.
        `notify=False`: no subscriber (`subscribe`) and no other process is woken by this
        commit; for data no watcher acts on, such as usage records.

        :raise StorageFull: the store's disk is full; nothing was changed.
        :raise StoreUnavailable: the database server cannot be reached; nothing was changed.
        """

    async def database_now(self) -> datetime:
        """The database's own clock (PostgreSQL `now()`), for times several hosts compare."""

    async def truncate_wal(self) -> None:
        """After deleting state versions: make their rows unreadable in the store's files as far as
        this engine allows (SQLite: checkpoint and truncate the WAL). Best effort, never raises."""

    async def probe_writable(self) -> None:
        """Take the write lock and let go of it. :raise Exception: the store cannot be written."""

    async def close(self) -> None: ...


# A subquery giving the strings of a JSON array passed as one `?` parameter: a list of any length
# in one statement, with no placeholders to count.
JSON_STRINGS = {
    Dialect.SQLITE: "SELECT value FROM json_each(?)",
    Dialect.POSTGRESQL: "SELECT json_array_elements_text(CAST(? AS json))",
}


@functools.lru_cache(maxsize=1024)
def to_format_placeholders(query: str) -> str:
    """`query` with each `?` outside string literals and quoted names as `%s`, and each `%` as `%%`
    (the driver's paramstyle). Queries are constants, so the translations are cached."""
    out: list[str] = []
    quote: str | None = None
    for char in query:
        if quote is not None:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "?":
            out.append("%s")
            continue
        out.append("%%" if char == "%" else char)
    return "".join(out)
