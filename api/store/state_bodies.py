"""Where api/store/states.py keeps the bodies of state versions, and its cache of current ones.

On SQLite a new body goes to a file beside the store (api/store/body_files.py) and its row keeps
an empty `body` and the file's name in `body_file`. On PostgreSQL, and in rows SQLite wrote before
the files, the body is in the row: both are read the same way.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from api.store.body_files import BODY_DIR_NAME, BodyFiles
from api.store.db import SQLiteDatabase
from api.store.sql import FAILURES, Database, Row, Transaction

log = structlog.get_logger(__name__)
# Sweeps leave files younger than this: they may belong to a write whose row is on its way
# (a writer whose file was swept anyway writes it again, so this only saves that work).
ORPHAN_GRACE_SECONDS = 60.0
SWEEP_INTERVAL_SECONDS = 600.0
_REFERENCED = "SELECT body_file FROM state_versions WHERE body_file IS NOT NULL"


@dataclass(frozen=True, slots=True)
class StoredState:
    version: int
    serial: int | None
    lineage: str | None
    md5: str
    body: bytes


@dataclass(frozen=True, slots=True)
class NewBody:
    """A body about to be inserted, and the values of its row's `body` and `body_file`."""

    body: bytes
    md5: str
    file: str | None

    @property
    def column(self) -> bytes:
        return b"" if self.file is not None else self.body


class StateBodies:
    """Bodies in files (SQLite with a path) or in rows (PostgreSQL, an in-memory store)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        path = db.path if isinstance(db, SQLiteDatabase) else None
        self._files = BodyFiles(path.parent / BODY_DIR_NAME) if path is not None else None

    async def prepare(self, body: bytes, md5: str) -> NewBody:
        """Make `body` durable where its row will point (a file), before the row's transaction.

        :raise StorageFull: no room for it.
        """
        if self._files is None:
            return NewBody(body, md5, None)
        return NewBody(body, md5, await asyncio.to_thread(self._files.create, body))

    async def keep(self, new: NewBody) -> NewBody:
        """Inside the row's transaction: the body as it is, or written again if a sweep took its
        file meanwhile (sweeps run in write transactions too, so none can take it after this)."""
        if self._files is None or new.file is None or self._files.exists(new.file):
            return new
        log.warning("state_body_rewritten", file=new.file)
        return NewBody(new.body, new.md5, await asyncio.to_thread(self._files.create, new.body))

    async def discard(self, new: NewBody) -> None:
        """After a write that was refused before it could commit: remove its file."""
        if new.file is not None:
            await self.forget([new.file])

    async def load(self, row: Row) -> bytes:
        """The body of a row read with `body, body_file, size, md5`.

        :raise BodyDamaged: its file is missing or does not match the row.
        """
        if row["body_file"] is None or self._files is None:
            return bytes(row["body"])
        return await asyncio.to_thread(self._files.load, row["body_file"], size=row["size"], md5=row["md5"])

    async def forget(self, names: Iterable[str | None]) -> None:
        """Remove the files of rows whose removal has committed. Best effort: what is left is
        an orphan for the next sweep."""
        files = self._files
        wanted = [name for name in names if name is not None]
        if files is None or not wanted:
            return
        try:
            await asyncio.to_thread(files.remove, wanted)
        except OSError as err:
            log.warning("state_body_remove_failed", error=str(err))

    async def sweep(self) -> int:
        """Remove the files no row names; how many. Runs in a write transaction (see keep)."""
        files = self._files
        if files is None or not files.directory.exists():
            return 0
        # Looked for outside the write lock first: there is seldom anything to remove.
        if not await self._orphans(files, await self._db.read(_REFERENCED)):
            return 0
        async with self._db.write(notify=False) as conn:
            orphans = await self._orphans(files, await conn.fetchall(_REFERENCED))
            return await asyncio.to_thread(files.remove, orphans)

    @staticmethod
    async def _orphans(files: BodyFiles, referencing: list[Row]) -> list[str]:
        referenced = {str(row[0]) for row in referencing}
        return await asyncio.to_thread(files.unreferenced, referenced, older_than=ORPHAN_GRACE_SECONDS)

    async def sweep_forever(self) -> None:
        """Sweep now and every SWEEP_INTERVAL_SECONDS: orphans come from crashes and restores."""
        while True:
            try:
                removed = await self.sweep()
                if removed:
                    log.info("state_bodies_swept", removed=removed)
            except (*FAILURES, OSError) as err:  # a busy store: the next sweep tries again
                log.warning("state_body_sweep_failed", error=str(err))
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)


async def removed_files(conn: Transaction, query: str, params: tuple[object, ...]) -> list[str | None]:
    """Run a `DELETE FROM state_versions ... RETURNING body_file`; the files to forget once the
    transaction has committed."""
    return [row[0] for row in await conn.fetchall(query, params)]


class BodyCache:
    """The newest body per project, bounded in bytes, least recently used evicted first."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, StoredState] = OrderedDict()
        self._bytes = 0

    def forget(self, project: str) -> None:
        previous = self._entries.pop(project, None)
        if previous is not None:
            self._bytes -= len(previous.body)

    def get(self, project: str, version: int) -> StoredState | None:
        stored = self._entries.get(project)
        if stored is None or stored.version != version:
            return None
        self._entries.move_to_end(project)
        return stored

    def put(self, project: str, stored: StoredState) -> None:
        self.forget(project)
        if len(stored.body) > self._max_bytes:
            return
        self._entries[project] = stored
        self._bytes += len(stored.body)
        while self._bytes > self._max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted.body)
