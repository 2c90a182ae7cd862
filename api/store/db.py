"""The SQLite connection: pragmas, migrations and write transactions.

Two aiosqlite connections per process: a writer and a read-only reader. Write transactions are
serialised by an asyncio lock and start with BEGIN IMMEDIATE, so two processes on one data dir
(api + controller) queue on SQLite's busy timeout instead of failing halfway through a
read-then-write. Reads never use the writer: in WAL mode the reader sees only committed
snapshots, so no request is served data from a transaction that may still roll back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from pathlib import Path

import aiosqlite
import structlog

from api.store.errors import StorageFull
from api.store.files import keep_open_store_files_private, make_store_files_private, secure_data_dir
from api.store.schema import MIGRATIONS
from api.store.sql import Clock, Database, Dialect, Row, Transaction, utc_now
from api.store.subscribers import Subscribers

__all__ = ["Clock", "Database", "SQLiteDatabase", "Transaction", "open_database", "utc_now"]

log = structlog.get_logger(__name__)
DB_FILE_NAME = "tofu-qemu.sqlite3"
BUSY_TIMEOUT_MS = 10_000
# FULL: an acknowledged state write survives power loss, not only a process kill.
DURABLE_SYNCHRONOUS = "FULL"
# data_version() asks SQLite at least this often even while the WAL file looks unchanged
# (see SQLiteDatabase.data_version).
DATA_VERSION_RECHECK_SECONDS = 10.0


class SQLiteTransaction:
    """api/store/sql.py's Transaction on the writer connection."""

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection

    async def execute(self, query: str, params: Sequence[object] = ()) -> int:
        async with self._connection.execute(query, params) as cursor:
            return cursor.rowcount

    async def executemany(self, query: str, rows: Sequence[Sequence[object]]) -> None:
        await self._connection.executemany(query, rows)

    async def fetchall(self, query: str, params: Sequence[object] = ()) -> list[Row]:
        return list(await self._connection.execute_fetchall(query, params))

    async def fetchone(self, query: str, params: Sequence[object] = ()) -> Row | None:
        # One aiosqlite job, not three (execute, fetch, close): each is a hop to its thread,
        # and a status write makes several (hack/bench/converge counted them).
        rows = await self._connection.execute_fetchall(query, params)
        return next(iter(rows), None)


class SQLiteDatabase:
    """A migrated connection plus the write lock and the clock every store uses."""

    dialect = Dialect.SQLITE

    def __init__(
        self,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        *,
        clock: Clock,
        path: Path | None = None,
    ) -> None:
        self._writer = writer
        self._writer.row_factory = sqlite3.Row
        self._transaction = SQLiteTransaction(writer)
        self.reader = reader
        self.clock = clock
        self._write_lock = asyncio.Lock()
        self._subscribers = Subscribers()
        # The store file; state bodies are kept in files beside it (api/store/state_bodies.py).
        self.path = path
        # The WAL file's (inode, size, mtime) when data_version last asked SQLite, and its answer.
        self._wal_path = None if path is None else Path(f"{path}-wal")
        self._wal_seen: tuple[int, int, int] | None = None
        self._version = 0
        self._version_asked_at = float("-inf")

    def subscribe(self, callback: Callable[[], None], *, volatile: bool = True) -> None:
        """Call `callback` after committed writes of this process (Database.subscribe).

        Writes by other processes on the same file are seen through `data_version` instead.
        """
        self._subscribers.add(callback, volatile=volatile)

    async def read(self, query: str, params: Sequence[object] = ()) -> list[Row]:
        """Run a read-only query to completion in one step on the reader connection.

        One aiosqlite job per query: a cursor kept open across an await would hold a read
        snapshot that other coroutines' queries on this connection then share, and they could
        miss writes committed meanwhile (a GET returning the state before an acknowledged POST).
        """
        return list(await self.reader.execute_fetchall(query, params))

    async def data_version(self) -> int:
        """SQLite's counter of commits made by *other* connections (PRAGMA data_version).

        Pollers ask every second. Every commit writes the WAL, so while the WAL file's inode,
        size and mtime are as they were at the last PRAGMA, the answer is the same and is given
        from a stat, without a query on the reader's thread. A commit within the mtime's
        granularity of the previous one, into a WAL restarted from its beginning, could look
        unchanged: the PRAGMA is asked every DATA_VERSION_RECHECK_SECONDS all the same.
        """
        wal = self._wal_signature()
        now = time.monotonic()
        fresh = now - self._version_asked_at < DATA_VERSION_RECHECK_SECONDS
        if wal is not None and wal == self._wal_seen and fresh:
            return self._version
        rows = await self.read("PRAGMA data_version")
        self._version = int(rows[0][0]) if rows else 0
        self._wal_seen, self._version_asked_at = wal, now
        return self._version

    def _wal_signature(self) -> tuple[int, int, int] | None:
        if self._wal_path is None:
            return None
        try:
            found = os.stat(self._wal_path)
        except OSError:
            return None
        return found.st_ino, found.st_size, found.st_mtime_ns

    async def database_now(self) -> datetime:
        """One machine holds the file, so the store clock is the database's."""
        return self.clock()

    @contextlib.asynccontextmanager
    async def write(self, *, durable: bool = True, notify: bool = True) -> AsyncIterator[Transaction]:
        """Run the block in one IMMEDIATE transaction; commit on success, roll back otherwise.

        `durable=False` skips the fsync at commit (synchronous=NORMAL for this transaction):
        the write survives a process crash but may be lost with the machine. Only for data
        that is recomputed anyway, such as VM status; the next durable commit syncs it too.

        Subscribers are called after a commit that changed rows, unless `notify` is False (a
        write no watcher acts on, such as usage records).

        :raise StorageFull: when SQLite reports a full disk; the transaction is rolled back.
        """
        async with self._write_lock:
            changes_before = self._writer.total_changes
            try:
                if not durable:
                    await self._writer.execute("PRAGMA synchronous = NORMAL")
                await self._writer.execute("BEGIN IMMEDIATE")
                yield self._transaction
                await self._writer.commit()
            except BaseException as err:
                # Also on cancellation: a cancelled await does not stop aiosqlite's thread, so a
                # BEGIN waiting on the busy timeout still opens its transaction later. The
                # rollback runs after it on that thread and ends it.
                await self._writer.rollback()
                if isinstance(err, sqlite3.OperationalError) and _is_disk_full(err):
                    raise StorageFull("the data dir is full; the write was not stored") from err
                raise
            finally:
                if not durable:
                    await self._writer.execute(f"PRAGMA synchronous = {DURABLE_SYNCHRONOUS}")
            changed = self._writer.total_changes != changes_before
        if notify and changed:
            self._subscribers.committed(durable=durable)

    async def probe_writable(self) -> None:
        """Take SQLite's write lock and let go of it, changing nothing and waking no subscriber.

        :raise sqlite3.Error: the store cannot be written (busy past the timeout, read-only...).
        """
        async with self._write_lock:
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
            finally:
                await self._writer.rollback()

    async def truncate_wal(self) -> None:
        """Checkpoint the WAL into the file and truncate it, so that the pages of rows just
        deleted (zeroed in the file by secure_delete) are no longer readable in old WAL frames.

        Best effort: with another process reading or writing, SQLite checkpoints what it can and
        the rest goes at a later checkpoint, as the WAL is reused from its start.
        """
        async with self._write_lock:
            try:
                await self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError as err:
                log.warning("wal_truncate_failed", error=str(err))

    async def close(self) -> None:
        await self.reader.close()
        await self._writer.close()


async def open_database(data_dir: Path, *, clock: Clock = utc_now) -> SQLiteDatabase:
    """Open (creating if needed) the store in `data_dir` and bring its schema up to date.

    The data dir and the store files are made private first (api/store/files.py).

    :raise UnsafeDataDir: the data dir is writable by other users.
    """
    path = data_dir / DB_FILE_NAME
    await asyncio.to_thread(_prepare_private_store, data_dir, path)
    writer = await aiosqlite.connect(path, isolation_level=None)
    try:
        await _configure(writer)
        # Deleted rows (old versions, a deleted state) are overwritten with zeros, not left in
        # free pages where their secrets would stay readable in the file.
        await writer.execute("PRAGMA secure_delete = ON")
        await _migrate(writer)
        # SQLite has created -wal and -shm by now, with the main file's mode; this checks it.
        await asyncio.to_thread(keep_open_store_files_private, path)
        reader = await aiosqlite.connect(path, isolation_level=None)
    except BaseException:
        await writer.close()
        raise
    try:
        await _configure(reader)
        await reader.execute("PRAGMA query_only = ON")
        reader.row_factory = sqlite3.Row
    except BaseException:
        await reader.close()
        await writer.close()
        raise
    return SQLiteDatabase(writer, reader, clock=clock, path=path)


def _prepare_private_store(data_dir: Path, path: Path) -> None:
    secure_data_dir(data_dir)
    # Created 0600 before SQLite opens it: SQLite would create it 0644 under the usual umask.
    make_store_files_private(path)


async def _configure(connection: aiosqlite.Connection) -> None:
    await connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    await connection.execute("PRAGMA journal_mode = WAL")
    await connection.execute(f"PRAGMA synchronous = {DURABLE_SYNCHRONOUS}")
    await connection.execute("PRAGMA foreign_keys = ON")


async def _migrate(connection: aiosqlite.Connection) -> None:
    async with connection.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    applied = int(row[0]) if row else 0
    for number, script in enumerate(MIGRATIONS[applied:], start=applied + 1):
        await connection.executescript(
            f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;"
        )


def _is_disk_full(err: sqlite3.OperationalError) -> bool:
    return getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(err)
