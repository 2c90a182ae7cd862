"""Terraform states: the current document, its versions, its lock, and when specs are published.

Versions hold whatever secrets the state holds. The newest `history_limit` are kept (plus the
current and the published one); `purge` removes the rest on demand, and `delete` removes them
all. On SQLite their bodies are files (api/store/state_bodies.py), removed with their rows;
deleted rows are zeroed in the file (secure_delete, api/store/db.py) and the WAL truncated.

Lock semantics (docs/backend.md#locks, #policy-choices):
- LOCK when free stores the body verbatim; LOCK by the holder's own ID is idempotent (clients
  retry LOCK on 5xx); LOCK by anyone else is a conflict carrying the holder's body.
- A write with `?ID=` must name the holder (else LockMismatch); a write with no ID while the
  state is locked is refused (StateLocked). A write with an ID while nobody holds the lock is
  accepted: it is what a client does after its lock was force-unlocked and nobody took it.
- UNLOCK with no ID (Terraform's force-unlock sends an empty body) or with the holder's ID
  releases; a different ID is a LockMismatch. UNLOCK of a free state succeeds.

Publishing (docs/backend.md#publishing): a write under a lock may be an intermediate snapshot of a long
apply, so its VM specs are published only when the lock is released, when the write came with no
lock held, or when the lock has been held longer than the stale-lock limit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from api.infra.tracing import current_traceparent
from api.publish import SpecChanges
from api.store import instancetypes as stored_types
from api.store import vms
from api.store.body_files import BodyMissing
from api.store.db import Database, Transaction
from api.store.errors import LineageConflict, LockConflict, LockMismatch, NotFound, StateLocked, StorageFull
from api.store.lock_info import LockInfo, who_and_operation
from api.store.publishing import encode_extraction, publish_version
from api.store.state_bodies import BodyCache, NewBody, StateBodies, StoredState, removed_files
from api.tfstate import (
    Extraction,
    ExtractionProblem,
    StateSummary,
)

# Current state bodies kept in memory for GET (Terraform reads before every plan and apply).
CACHED_BODY_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: int
    serial: int | None
    lineage: str | None
    md5: str
    size: int
    created_at: datetime
    encryption_version: str | None
    lock_who: str | None
    lock_operation: str | None


@dataclass(frozen=True, slots=True)
class HeldLock:
    info: dict[str, Any]
    locked_at: datetime


@dataclass(frozen=True, slots=True)
class ProjectInfo:
    name: str
    serial: int | None
    lineage: str | None
    published_serial: int | None
    pending_serial: int | None
    lock: HeldLock | None
    specs_note: str | None
    problems: tuple[ExtractionProblem, ...]
    vm_count: int
    version_count: int


@dataclass(frozen=True, slots=True)
class PurgeOutcome:
    removed: int
    kept: int


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    version: int
    published: SpecChanges | None


class StateStore:
    """States, versions and locks of every project."""

    def __init__(self, db: Database, *, history_limit: int = 100, strict_lineage: bool = False) -> None:
        self._db = db
        self._history_limit = history_limit
        self._strict_lineage = strict_lineage
        self._bodies = BodyCache(CACHED_BODY_BYTES)
        self._files = StateBodies(db)

    async def read(self, project: str) -> StoredState | None:
        """The current state of `project`, or None when it has none.

        Bodies are cached in memory by version id; the id is read from the store every time, so
        another process's write (two servers on one data dir) is never hidden by the cache.
        """
        try:
            return await self._read(project)
        except BodyMissing:
            # Its version was deleted between reading its row and its file: read what is now.
            return await self._read(project)

    async def _read(self, project: str) -> StoredState | None:
        rows = await self._db.read("SELECT current_version FROM projects WHERE name = ?", (project,))
        if not rows or rows[0][0] is None:
            return None
        version = rows[0][0]
        cached = self._bodies.get(project, version)
        if cached is not None:
            return cached
        found_rows = await self._db.read(
            "SELECT id, serial, lineage, md5, body, body_file, size FROM state_versions WHERE id = ?",
            (version,),
        )
        if not found_rows:
            return None
        found = found_rows[0]
        stored = StoredState(found[0], found[1], found[2], found[3], await self._files.load(found))
        self._bodies.put(project, stored)
        return stored

    async def write(
        self,
        project: str,
        body: bytes,
        summary: StateSummary,
        extraction: Extraction | None,
        *,
        lock_id: str | None,
        md5: str | None = None,
    ) -> WriteOutcome:
        """Store `body` (the bytes as received) as the new current state and keep it as a version.

        `md5`: the body's MD5 in hex, when the caller has computed it already.

        :raise StateLocked: no lock ID given while the state is locked.
        :raise LockMismatch: the lock ID is not the holder's.
        :raise LineageConflict: strict_lineage is on and the lineage or serial do not follow.
        """
        now = self._db.clock()
        new = await self._files.prepare(body, md5 or hashlib.md5(body, usedforsecurity=False).hexdigest())
        try:
            version, published, pruned = await self._write(project, new, summary, extraction, lock_id, now)
        except (StateLocked, LockMismatch, LineageConflict, StorageFull):
            await self._files.discard(new)  # rolled back: no row names its file
            raise
        await self._files.forget(pruned)
        self._bodies.put(project, StoredState(version, summary.serial, summary.lineage, new.md5, body))
        return WriteOutcome(version, published)

    async def _write(
        self,
        project: str,
        new: NewBody,
        summary: StateSummary,
        extraction: Extraction | None,
        lock_id: str | None,
        now: datetime,
    ) -> tuple[int, SpecChanges | None, list[str | None]]:
        async with self._db.write() as conn:
            row = await _project_row(conn, project, create=True, now=now)
            holder_id, holder_info = row["lock_id"], row["lock_info"]
            if holder_id is not None:
                if lock_id is None:
                    raise StateLocked(bytes(holder_info))
                if lock_id != holder_id:
                    raise LockMismatch(bytes(holder_info))
            if self._strict_lineage:
                await _check_lineage(conn, row["current_version"], summary)
            # The extraction is kept only while the version may still need publishing (written
            # under a lock); an unlocked write is published right here from memory.
            kept = encode_extraction(extraction) if extraction is not None and holder_id is not None else None
            version = await _insert_version(
                conn,
                project,
                summary,
                await self._files.keep(new),
                now=now,
                lock_id=lock_id,
                holder_info=holder_info,
                extraction=kept,
            )
            await conn.execute("UPDATE projects SET current_version = ? WHERE name = ?", (version, project))
            published = None
            if holder_id is None:
                published = await publish_version(conn, project, version, now, extraction=extraction)
            pruned = await _drop_old_versions(conn, project, keep=self._history_limit)
        return version, published, pruned

    async def delete(self, project: str, *, lock_id: str | None) -> SpecChanges:
        """Forget the project's state: every kept version and its lock go with it (admin use).

        Versions hold the state's secrets, so none is kept; `tofu-qemu backup` is the way to keep
        a copy. Every VM of the project is marked for deletion.

        :raise NotFound: the project has no state.
        :raise StateLocked / LockMismatch: as for `write`.
        """
        now = self._db.clock()
        async with self._db.write() as conn:
            row = await _project_row(conn, project, create=False, now=now)
            if row is None or row["current_version"] is None:
                raise NotFound(f"project {project!r} has no state")
            if row["lock_id"] is not None and lock_id != row["lock_id"]:
                if lock_id is None:
                    raise StateLocked(bytes(row["lock_info"]))
                raise LockMismatch(bytes(row["lock_info"]))
            removed = await removed_files(
                conn, "DELETE FROM state_versions WHERE project = ? RETURNING body_file", (project,)
            )
            await conn.execute("DELETE FROM projects WHERE name = ?", (project,))
            changes = await vms.apply_declared(
                conn, project=project, declared=(), serial=None, now=now, trace=current_traceparent()
            )
            await stored_types.apply_declared(conn, project=project, declared=(), now=now)
        self._bodies.forget(project)
        await self._files.forget(removed)
        await self._db.truncate_wal()
        return changes

    async def purge(self, project: str, *, keep: int = 0) -> PurgeOutcome:
        """Remove the project's old versions, keeping the current and the published one (they
        differ while a write under a lock waits to be published) and the `keep` newest others.

        :raise NotFound: unknown project.
        """
        now = self._db.clock()
        async with self._db.write() as conn:
            if await _project_row(conn, project, create=False, now=now) is None:
                raise NotFound(f"project {project!r} does not exist")
            # The current version is always the newest: keep it and the `keep` before it.
            removed = await _drop_old_versions(conn, project, keep=keep + 1)
            row = await conn.fetchone("SELECT COUNT(*) FROM state_versions WHERE project = ?", (project,))
        if removed:
            await self._files.forget(removed)
            await self._db.truncate_wal()
        return PurgeOutcome(removed=len(removed), kept=int(row[0]) if row else 0)

    async def lock(self, project: str, info: LockInfo) -> None:
        """Take the lock for `info.id`; idempotent for the holder.

        :raise LockConflict: another ID holds it; carries the holder's lock info.
        """
        now = self._db.clock()
        async with self._db.write() as conn:
            row = await _project_row(conn, project, create=True, now=now)
            if row["lock_id"] == info.id:
                return
            if row["lock_id"] is not None:
                raise LockConflict(bytes(row["lock_info"]))
            await conn.execute(
                "UPDATE projects SET lock_id = ?, lock_info = ?, locked_at = ? WHERE name = ?",
                (info.id, info.raw, now.isoformat(), project),
            )

    async def unlock(self, project: str, lock_id: str | None) -> bytes | None:
        """Release the lock (lock_id None = force) and publish the state written under it.

        Returns the released holder's lock info, or None if the state was not locked.

        :raise LockMismatch: `lock_id` names someone other than the holder.
        """
        now = self._db.clock()
        async with self._db.write() as conn:
            row = await _project_row(conn, project, create=False, now=now)
            if row is None or row["lock_id"] is None:
                return None
            if lock_id is not None and lock_id != row["lock_id"]:
                raise LockMismatch(bytes(row["lock_info"]))
            await conn.execute(
                "UPDATE projects SET lock_id = NULL, lock_info = NULL, locked_at = NULL WHERE name = ?",
                (project,),
            )
            if row["current_version"] is not None and row["current_version"] != row["published_version"]:
                await publish_version(conn, project, row["current_version"], now)
            return bytes(row["lock_info"])

    async def publish_stale_locks(self, max_age: timedelta) -> list[str]:
        """Publish the current state of projects locked longer than `max_age`.

        A client that locks but never unlocks must not freeze its VMs
        (docs/backend.md#a-lock-address-without-an-unlock-address).
        Returns the projects published.
        """
        now = self._db.clock()
        cutoff = (now - max_age).isoformat()
        async with self._db.write() as conn:
            rows = await conn.fetchall(
                "SELECT name, current_version FROM projects WHERE lock_id IS NOT NULL AND locked_at < ?"
                " AND current_version IS NOT NULL"
                " AND current_version IS DISTINCT FROM published_version",
                (cutoff,),
            )
            stale = [(str(name), int(version)) for name, version in rows]
            for project, version in stale:
                await publish_version(conn, project, version, now)
        return [project for project, _ in stale]

    async def list_versions(self, project: str) -> list[VersionInfo]:
        """Every kept version of `project`, newest first. :raise NotFound: unknown project."""
        await self._require_project(project)
        rows = await self._db.read(
            "SELECT id, serial, lineage, md5, size, created_at, encryption_version, lock_who, lock_operation"
            " FROM state_versions WHERE project = ? ORDER BY id DESC",
            (project,),
        )
        return [
            VersionInfo(r[0], r[1], r[2], r[3], r[4], datetime.fromisoformat(r[5]), r[6], r[7], r[8])
            for r in rows
        ]

    async def read_version(self, project: str, serial: int) -> StoredState:
        """The newest kept version of `project` with `serial`. :raise NotFound: none kept."""
        rows = await self._db.read(
            "SELECT id, serial, lineage, md5, body, body_file, size FROM state_versions"
            " WHERE project = ? AND serial = ?"
            " ORDER BY id DESC LIMIT 1",
            (project, serial),
        )
        if not rows:
            raise NotFound(f"project {project!r} has no kept version with serial {serial}")
        row = rows[0]
        return StoredState(row[0], row[1], row[2], row[3], await self._files.load(row))

    async def sweep_bodies_forever(self) -> None:
        """Remove body files no version names (left by a crash or a restore), now and then."""
        await self._files.sweep_forever()

    async def list_projects(self) -> list[ProjectInfo]:
        return [await self._project_info(row) for row in await self._project_rows(None)]

    async def project(self, project: str) -> ProjectInfo:
        """:raise NotFound: unknown project."""
        rows = await self._project_rows(project)
        if not rows:
            raise NotFound(f"project {project!r} does not exist")
        return await self._project_info(rows[0])

    async def _require_project(self, project: str) -> None:
        if not await self._project_rows(project):
            raise NotFound(f"project {project!r} does not exist")

    async def _project_rows(self, project: str | None) -> list[dict[str, Any]]:
        query = (
            "SELECT p.name, p.lock_info, p.locked_at, p.specs_note, p.spec_problems,"
            " cur.serial AS serial, cur.lineage AS lineage, pub.serial AS published_serial,"
            " p.current_version IS DISTINCT FROM p.published_version AS pending,"
            " (SELECT COUNT(*) FROM vms WHERE vms.project = p.name AND deleted_at IS NULL) AS vm_count,"
            " (SELECT COUNT(*) FROM state_versions v WHERE v.project = p.name) AS version_count"
            " FROM projects p"
            " LEFT JOIN state_versions cur ON cur.id = p.current_version"
            " LEFT JOIN state_versions pub ON pub.id = p.published_version"
        )
        params: tuple[str, ...] = ()
        if project is not None:
            query += " WHERE p.name = ?"
            params = (project,)
        return [dict(row) for row in await self._db.read(query + " ORDER BY p.name", params)]

    async def _project_info(self, row: dict[str, Any]) -> ProjectInfo:
        lock = None
        if row["lock_info"] is not None:
            lock = HeldLock(json.loads(row["lock_info"]), datetime.fromisoformat(row["locked_at"]))
        problems = tuple(
            ExtractionProblem(p["address"], p["message"]) for p in json.loads(row["spec_problems"])
        )
        return ProjectInfo(
            name=row["name"],
            serial=row["serial"],
            lineage=row["lineage"],
            published_serial=row["published_serial"],
            pending_serial=row["serial"] if row["pending"] else None,
            lock=lock,
            specs_note=row["specs_note"],
            problems=problems,
            vm_count=row["vm_count"],
            version_count=row["version_count"],
        )


async def _insert_version(
    conn: Transaction,
    project: str,
    summary: StateSummary,
    new: NewBody,
    *,
    now: datetime,
    lock_id: str | None,
    holder_info: bytes | None,
    extraction: str | None,
) -> int:
    """Store `new` as a new version of `project`, with who held the lock; returns its id."""
    who, operation = who_and_operation(holder_info)
    inserted = await conn.fetchone(
        "INSERT INTO state_versions (project, serial, lineage, md5, size, created_at, lock_id,"
        " lock_who, lock_operation, encryption_version, body, extraction, body_file)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (
            project,
            summary.serial,
            summary.lineage,
            new.md5,
            len(new.body),
            now.isoformat(),
            lock_id,
            who,
            operation,
            summary.encryption_version,
            new.column,
            extraction,
            new.file,
        ),
    )
    assert inserted is not None
    return int(inserted[0])


async def _drop_old_versions(conn: Transaction, project: str, *, keep: int) -> list[str | None]:
    """Delete all but the `keep` newest versions, the current and the published; their files."""
    return await removed_files(
        conn,
        "DELETE FROM state_versions WHERE project = ? AND id NOT IN ("
        "  SELECT id FROM state_versions WHERE project = ? ORDER BY id DESC LIMIT ?)"
        " AND id NOT IN (SELECT current_version FROM projects"
        "                WHERE name = ? AND current_version IS NOT NULL)"
        " AND id NOT IN (SELECT published_version FROM projects"
        "                WHERE name = ? AND published_version IS NOT NULL) RETURNING body_file",
        (project, project, keep, project, project),
    )


async def _project_row(conn: Transaction, project: str, *, create: bool, now: datetime) -> Any:
    if create:
        await conn.execute(
            "INSERT INTO projects (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (project, now.isoformat()),
        )
    row = await conn.fetchone(
        "SELECT lock_id, lock_info, current_version, published_version FROM projects WHERE name = ?",
        (project,),
    )
    return dict(row) if row is not None else None


async def _check_lineage(conn: Transaction, current_version: int | None, new: StateSummary) -> None:
    if current_version is None:
        return
    row = await conn.fetchone("SELECT serial, lineage FROM state_versions WHERE id = ?", (current_version,))
    if row is None:
        return
    serial, lineage = row
    if lineage is not None and new.lineage is not None and lineage != new.lineage:
        raise LineageConflict(
            f"strict_lineage: stored state has lineage {lineage} (serial {serial}), "
            f"the write has lineage {new.lineage} (serial {new.serial})"
        )
    if serial is not None and new.serial is not None and new.serial < serial:
        raise LineageConflict(
            f"strict_lineage: stored state has serial {serial} (lineage {lineage}), "
            f"the write has the lower serial {new.serial} (lineage {new.lineage})"
        )
