"""The store on PostgreSQL (`--database-url postgresql://...`), through psycopg 3 and its pool.

Invariants:
- Write transactions are serialised by one transaction-scoped advisory lock, taken first (after
  an in-process lock, so one connection per process waits for it): what BEGIN IMMEDIATE gives
  on SQLite. Every read-then-write of the stores (a project's lock and
  current version in states.py, diff-then-apply of VM objects, a VM's override, port and disk
  rows in allocations.py, the resourceVersion counter that watch.py needs to commit in order)
  therefore runs alone, unchanged from SQLite. Finer locks (a row lock per project, the
  counter row) would let hosts write in parallel; the multi-host step measures whether it must.
- Reads run on pooled connections in autocommit: each statement sees only committed data.
- Other processes' commits are seen through LISTEN/NOTIFY on one dedicated connection: every
  write transaction notifies CHANGES_CHANNEL with this process's id before COMMIT (delivered
  only if it commits), and the listener counts the others'. It reconnects with backoff and
  counts a reconnect as a change, since notifications sent meanwhile are lost
  (`listen_forever`, which a controller's placement wake-ups use too).
- A server that cannot be reached is StoreUnavailable (HTTP 503), never an unknown error. A
  statement that fails on a pooled connection the server closed (a restart) is retried once on
  a fresh one when nothing of it can have been committed: a read, or a write's BEGIN.
- Migrations run under their own advisory lock, so replicas starting together migrate once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.rows import BaseRowFactory
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from api.store.errors import ConstraintViolation, DatabaseFailure, StorageFull, StoreError, StoreUnavailable
from api.store.schema import MIGRATIONS, postgresql_script
from api.store.sql import Clock, Dialect, Row, Transaction, to_format_placeholders, utc_now
from api.store.subscribers import Subscribers

log = structlog.get_logger(__name__)
CHANGES_CHANNEL = "tofu_qemu_changes"
# Arbitrary 64-bit keys of pg_advisory_xact_lock, one per purpose.
WRITE_LOCK_KEY = 0x7471_0001
MIGRATION_LOCK_KEY = 0x7471_0002
POOL_MIN_SIZE = 2
POOL_MAX_SIZE = 10
# How long a request waits for a connection (or for a server that went away) before it is
# answered 503: long enough for a restart of PostgreSQL, short enough for a client's retry.
CONNECT_TIMEOUT_SECONDS = 5.0
LISTEN_BACKOFF_SECONDS = (0.2, 5.0)
_DISK_FULL = "53100"
# Writers queue on one in-process lock, and each would wait its own CONNECT_TIMEOUT_SECONDS for a
# server that is down: the k-th would answer after k times that. A writer that gets the lock
# within this long of another's failed wait answers 503 at once instead.
UNREACHABLE_MEMORY_SECONDS = 1.0


class PgRow(tuple[Any, ...]):
    """A row by position or by column name, as sqlite3.Row gives it."""

    _columns: tuple[str, ...] = ()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(self._columns.index(key))
        return super().__getitem__(key)

    def keys(self) -> list[str]:
        return list(self._columns)


def _pg_row_factory(cursor: psycopg.AsyncCursor[Any]) -> Callable[[Sequence[Any]], PgRow]:
    return _row_class(tuple(column.name for column in cursor.description or ()))


@functools.lru_cache(maxsize=256)
def _row_class(columns: tuple[str, ...]) -> type[PgRow]:
    return type("PgRow", (PgRow,), {"_columns": columns, "__slots__": ()})


ROW_FACTORY: BaseRowFactory[PgRow] = _pg_row_factory  # type: ignore[assignment]


class PostgresTransaction:
    """api/store/sql.py's Transaction on one pooled connection inside BEGIN ... COMMIT."""

    def __init__(self, connection: psycopg.AsyncConnection[PgRow]) -> None:
        self._connection = connection

    async def execute(self, query: str, params: Sequence[object] = ()) -> int:
        cursor = await self._execute(query, params)
        return cursor.rowcount

    async def executemany(self, query: str, rows: Sequence[Sequence[object]]) -> None:
        with _unavailable_on_connection_errors():
            async with self._connection.cursor() as cursor:
                await cursor.executemany(to_format_placeholders(query), rows)

    async def fetchall(self, query: str, params: Sequence[object] = ()) -> list[Row]:
        cursor = await self._execute(query, params)
        return list(await cursor.fetchall())

    async def fetchone(self, query: str, params: Sequence[object] = ()) -> Row | None:
        cursor = await self._execute(query, params)
        return await cursor.fetchone()

    async def _execute(self, query: str, params: Sequence[object]) -> psycopg.AsyncCursor[PgRow]:
        # The results are fetched with the statement: fetchall/fetchone above do no I/O.
        try:
            return await self._connection.execute(to_format_placeholders(query), params)
        except psycopg.Error as err:
            raise store_error(err) from err


class PostgresDatabase:
    """api/store/sql.py's Database on a PostgreSQL server."""

    dialect = Dialect.POSTGRESQL

    def __init__(self, pool: AsyncConnectionPool[psycopg.AsyncConnection[PgRow]], url: str, *, clock: Clock):
        self._pool = pool
        self._url = url
        self.clock = clock
        self._subscribers = Subscribers()
        self._instance = uuid.uuid4().hex
        self._others_commits = 0
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        # One writer per process at a time, as on SQLite: the others wait here, not on the
        # advisory lock, where each would hold a pooled connection that reads need.
        self._write_lock = asyncio.Lock()
        self._unreachable_at = float("-inf")

    @property
    def url(self) -> str:
        """The server's URL, for a connection of one's own (api/store/lease_renewal.py)."""
        return self._url

    def subscribe(self, callback: Callable[[], None], *, volatile: bool = True) -> None:
        self._subscribers.add(callback, volatile=volatile)

    async def data_version(self) -> int:
        return self._others_commits

    async def start_listening(self) -> None:
        """Start the change feed and wait until it listens, so no commit made after the store
        opened goes unnoticed. :raise StoreUnavailable: it could not listen in time."""
        self._listener = asyncio.create_task(self._listen_forever(), name="postgres-listener")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                await self._listening.wait()
        except TimeoutError as err:
            await self.close()
            raise StoreUnavailable("the PostgreSQL server did not accept LISTEN in time") from err

    async def read(self, query: str, params: Sequence[object] = ()) -> list[Row]:
        translated = to_format_placeholders(query)
        for attempt in (1, 2):
            with _unavailable_on_connection_errors():
                async with self._pool.connection() as connection:
                    try:
                        cursor = await connection.execute(translated, params)
                        return list(await cursor.fetchall())
                    except psycopg.OperationalError:
                        if attempt == 2 or not connection.broken:
                            raise
        raise AssertionError("unreachable")

    async def database_now(self) -> datetime:
        rows = await self.read("SELECT now()")
        value = rows[0][0]
        assert isinstance(value, datetime)
        return value

    @contextlib.asynccontextmanager
    async def write(self, *, durable: bool = True, notify: bool = True) -> AsyncIterator[Transaction]:
        begin = "BEGIN; " + ("" if durable else "SET LOCAL synchronous_commit = off; ")
        begin += f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"
        with _unavailable_on_connection_errors():
            async with self._writer(), self._begun(begin) as connection:
                try:
                    yield PostgresTransaction(connection)
                    commit = sql.SQL("NOTIFY {}, {}; COMMIT").format(
                        sql.Identifier(CHANGES_CHANNEL), sql.Literal(self._instance)
                    )
                    await connection.execute(commit if notify else "COMMIT")
                except BaseException:
                    with contextlib.suppress(psycopg.Error):
                        await connection.execute("ROLLBACK")
                    raise
        if notify:
            self._subscribers.committed(durable=durable)

    @contextlib.asynccontextmanager
    async def _writer(self) -> AsyncIterator[None]:
        """This process's turn to write. :raise StoreUnavailable: the writer before found the
        server unreachable within UNREACHABLE_MEMORY_SECONDS."""
        async with self._write_lock:
            if time.monotonic() - self._unreachable_at < UNREACHABLE_MEMORY_SECONDS:
                raise StoreUnavailable(
                    "the PostgreSQL server cannot be reached (the write before this one found so)"
                )
            try:
                yield
            except PoolTimeout:
                self._unreachable_at = time.monotonic()
                raise

    @contextlib.asynccontextmanager
    async def _begun(self, begin: str) -> AsyncIterator[psycopg.AsyncConnection[PgRow]]:
        """A pooled connection inside a transaction that holds the write lock. A connection the
        server closed since it was pooled is replaced once: nothing has been written yet."""
        for attempt in (1, 2):
            async with self._pool.connection() as connection:
                try:
                    await connection.execute(begin)
                except psycopg.OperationalError:
                    if attempt == 2 or not connection.broken:
                        raise
                    continue
                yield connection
                return

    async def probe_writable(self) -> None:
        begin = f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"
        with _unavailable_on_connection_errors():
            async with self._writer(), self._begun(begin) as connection:
                await connection.execute("ROLLBACK")

    async def truncate_wal(self) -> None:
        """Nothing to do from here: PostgreSQL reuses dead rows' space after VACUUM and keeps
        WAL segments as the server's archiving says (docs/postgres.md, "Deleted versions")."""

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._pool.close()

    async def _listen_forever(self) -> None:
        """Count other processes' commits, reconnecting with backoff until cancelled."""

        def counted(payload: str) -> None:
            if payload != self._instance:
                self._others_commits += 1

        def listening(again: bool) -> None:
            if again:  # notifications sent while we were away are lost: look again
                self._others_commits += 1
            self._listening.set()

        await listen_forever(self._url, CHANGES_CHANNEL, counted, listening=listening)


async def listen_forever(
    url: str,
    channel: str,
    notified: Callable[[str], None],
    *,
    listening: Callable[[bool], None] = lambda _again: None,
) -> None:
    """LISTEN on `channel` on a dedicated connection and call `notified(payload)` for each
    notification, until cancelled. A lost connection (PostgreSQL restarted or unreachable) is
    made again with backoff (LISTEN_BACKOFF_SECONDS, doubling); `listening(again)` is called each
    time it listens, `again` True after a reconnect, whose gap may have lost notifications."""
    delay, max_delay = LISTEN_BACKOFF_SECONDS
    again = False
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_SECONDS)
            ) as connection:
                await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                listening(again)
                delay = LISTEN_BACKOFF_SECONDS[0]
                async for notice in connection.notifies():
                    notified(notice.payload)
        except psycopg.Error as err:
            log.warning("postgres_listener_reconnecting", channel=channel, error=str(err), delay=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)
        again = True


@contextlib.contextmanager
def _unavailable_on_connection_errors() -> Iterator[None]:
    """A lost server as StoreUnavailable, and every other driver error as the store's own."""
    try:
        yield
    except psycopg.Error as err:
        raise store_error(err) from err


def store_error(err: psycopg.Error) -> StoreError:
    """The driver's error as the store's own, typed by what the caller can do: no module but
    this one names psycopg, so a process on SQLite never imports it (api/store/sql.py)."""
    if isinstance(err, psycopg.OperationalError):  # PoolTimeout is one too
        if err.sqlstate == _DISK_FULL:
            return StorageFull("the database's disk is full; the write was not stored")
        return StoreUnavailable(f"the PostgreSQL server cannot be reached: {err}")
    if isinstance(err, psycopg.IntegrityError):
        return ConstraintViolation(str(err))
    return DatabaseFailure(str(err))


# For modules that keep a connection of their own (api/store/lease_renewal.py).
unavailable_on_connection_errors = _unavailable_on_connection_errors


async def open_postgres(url: str, *, clock: Clock = utc_now) -> PostgresDatabase:
    """Connect to `url`, bring its schema up to date and return the store.

    :raise StoreUnavailable: the server cannot be reached within CONNECT_TIMEOUT_SECONDS.
    """
    pool: AsyncConnectionPool[psycopg.AsyncConnection[PgRow]] = AsyncConnectionPool(
        url,
        min_size=POOL_MIN_SIZE,
        max_size=POOL_MAX_SIZE,
        timeout=CONNECT_TIMEOUT_SECONDS,
        kwargs={
            "autocommit": True,
            "row_factory": ROW_FACTORY,
            "connect_timeout": int(CONNECT_TIMEOUT_SECONDS),
        },
        open=False,
        name="tofu-qemu",
    )
    try:
        with _unavailable_on_connection_errors():
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_SECONDS)
            async with pool.connection() as connection:
                await migrate(connection)
    except BaseException:
        await pool.close()
        raise
    database = PostgresDatabase(pool, url, clock=clock)
    await database.start_listening()
    return database


async def schema_version(connection: psycopg.AsyncConnection[Any]) -> int:
    cursor = await connection.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    exists = await cursor.fetchone()
    if not exists or not exists[0]:
        return 0
    cursor = await connection.execute("SELECT version FROM schema_version")
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def migrate(connection: psycopg.AsyncConnection[Any], *, up_to: int | None = None) -> None:
    """Apply the migrations not yet applied (up to `up_to`), each in its own transaction."""
    target = len(MIGRATIONS) if up_to is None else up_to
    while True:
        async with connection.transaction():
            await connection.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
            await connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            applied = await schema_version(connection)
            if applied >= target:
                return
            await connection.execute(postgresql_script(MIGRATIONS[applied]).encode())
            await connection.execute("DELETE FROM schema_version")
            await connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (applied + 1,))
