"""What a watch needs from the store: a list at one resourceVersion, and the changes after one.

Every change of a VM object takes the next value of the store-wide counter as the object's
resourceVersion, in the same transaction (api/store/vms.py). Writes are serialised (BEGIN
IMMEDIATE, across processes too), so versions commit in order: once a reader sees counter C,
every change numbered ≤ C is committed and visible. `changes(after=N)` therefore reads C first
and then only what lies in (N, C]; anything newer is left for the next call, which starts at C.

An object removed by finalize leaves a tombstone (the object as last served, with the version
of its removal) so that a watch resumed from an older version still learns it is gone.
Tombstones are kept TOMBSTONE_RETENTION and at most TOMBSTONES_MAX; pruning happens when a new
tombstone is written (nothing else adds any). The newest pruned version is remembered in a
marker row (uid ""; no VM has an empty uid): a resume from before it cannot be answered
completely and is Expired (410), so the client re-lists, as with Kubernetes' compaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from api.store.db import Database, Transaction
from api.store.errors import StoreError
from api.store.vms import VM_COLUMNS, VMRecord, decode_vm_row

TOMBSTONE_RETENTION = timedelta(hours=1)
TOMBSTONES_MAX = 10_000
# The tombstone table row that remembers the newest pruned resourceVersion.
HORIZON_UID = ""
_LIVE_COLUMNS = ", ".join(f"v.{column.strip()}" for column in VM_COLUMNS.split(","))


class Expired(StoreError):
    """The resourceVersion is older than the retained history (or newer than the store): re-list."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Objects as they were at `resource_version`."""

    resource_version: int
    records: list[VMRecord]


@dataclass(frozen=True, slots=True)
class Tombstone:
    uid: str
    project: str
    name: str
    resource_version: int
    # The QemuVM as the API served it last, with metadata.resourceVersion of its removal.
    object: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Changes:
    """Everything that changed in (after, resource_version], oldest first per kind."""

    resource_version: int
    live: list[VMRecord]
    removed: list[Tombstone]


class WatchStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def snapshot(self, *, project: str | None = None) -> Snapshot:
        """Every object (live or being deleted), with the counter, read in one statement and so
        from one snapshot: the list's resourceVersion covers exactly the objects in it."""
        join = "v.project = ?" if project is not None else "TRUE"
        rows = await self._db.read(
            f"SELECT r.value, {_LIVE_COLUMNS} FROM resource_versions r"  # noqa: S608
            f" LEFT JOIN vms v ON {join} WHERE r.id = 1"
            " ORDER BY v.project, v.name, v.deleted_at IS NOT NULL",
            (project,) if project is not None else (),
        )
        version = int(rows[0][0]) if rows else 0
        return Snapshot(version, [decode_vm_row(row[1:]) for row in rows if row[1] is not None])

    async def current_version(self) -> int:
        rows = await self._db.read("SELECT value FROM resource_versions WHERE id = 1")
        return int(rows[0][0]) if rows else 0

    async def changes(self, after: int, *, project: str | None = None) -> Changes:
        """Objects changed and removed after `after`, up to the counter as read first.

        :raise Expired: `after` is older than the oldest retained tombstone history, or newer
            than the store's counter (a store restored from an older backup).
        """
        current = await self.current_version()
        if after > current:
            raise Expired(f"resource version {after} is newer than the store's ({current}); list again")
        if after == current:  # nothing new; the horizon never passes the counter
            return Changes(current, [], [])
        scope, params = ("AND project = ?", (after, current, project)) if project else ("", (after, current))
        live = await self._db.read(
            f"SELECT {VM_COLUMNS} FROM vms WHERE resource_version > ? AND resource_version <= ? {scope}"  # noqa: S608
            " ORDER BY resource_version",
            params,
        )
        removed = await self._db.read(
            "SELECT uid, project, name, resource_version, object FROM vm_tombstones"  # noqa: S608
            f" WHERE resource_version > ? AND resource_version <= ? AND uid != '' {scope}"
            " ORDER BY resource_version",
            params,
        )
        # Checked after reading: a prune that ran meanwhile may have taken tombstones we needed.
        horizon = await self.horizon()
        if after < horizon:
            raise Expired(f"too old resource version: {after} (the oldest kept is {horizon}); list again")
        return Changes(
            current,
            [decode_vm_row(row) for row in live],
            [Tombstone(row[0], row[1], row[2], int(row[3]), json.loads(row[4])) for row in removed],
        )

    async def horizon(self) -> int:
        """The newest resourceVersion whose tombstone was pruned (0: none ever was)."""
        rows = await self._db.read("SELECT resource_version FROM vm_tombstones WHERE uid = ?", (HORIZON_UID,))
        return int(rows[0][0]) if rows else 0


async def bury(conn: Transaction, record: VMRecord, *, now: datetime) -> int:
    """Inside the caller's transaction (the finalize that deletes `record`'s row): take the next
    resourceVersion, keep the object as served with it as a tombstone, prune old tombstones.

    Returns the tombstone's resourceVersion.
    """
    row = await conn.fetchone("UPDATE resource_versions SET value = value + 1 WHERE id = 1 RETURNING value")
    assert row is not None
    version = int(row[0])
    rendered = record.to_object()
    rendered = rendered.model_copy(
        update={"metadata": rendered.metadata.model_copy(update={"resource_version": str(version)})}
    )
    await conn.execute(
        "INSERT INTO vm_tombstones (uid, project, name, resource_version, object, deleted_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (uid) DO UPDATE SET project = excluded.project,"
        " name = excluded.name, resource_version = excluded.resource_version,"
        " object = excluded.object, deleted_at = excluded.deleted_at",
        (
            record.uid,
            record.project,
            record.name,
            version,
            rendered.model_dump_json(by_alias=True),
            now.isoformat(),
        ),
    )
    await _prune(conn, now=now)
    return version


async def _prune(conn: Transaction, *, now: datetime) -> None:
    """Drop tombstones older than the retention or beyond the newest TOMBSTONES_MAX, and move
    the horizon marker up to the newest version dropped."""
    cutoff = (now - TOMBSTONE_RETENTION).isoformat()
    doomed = "uid != ? AND (deleted_at < ? OR resource_version <= COALESCE((SELECT resource_version FROM vm_tombstones WHERE uid != ? ORDER BY resource_version DESC LIMIT 1 OFFSET ?), -1))"  # noqa: E501
    params = (HORIZON_UID, cutoff, HORIZON_UID, TOMBSTONES_MAX)
    query = f"SELECT MAX(resource_version) FROM vm_tombstones WHERE {doomed}"  # noqa: S608
    row = await conn.fetchone(query, params)
    newest_pruned = row[0] if row else None
    if newest_pruned is None:
        return
    await conn.execute(f"DELETE FROM vm_tombstones WHERE {doomed}", params)  # noqa: S608
    await conn.execute(
        "INSERT INTO vm_tombstones (uid, project, name, resource_version, object, deleted_at)"
        " VALUES (?, '', '', ?, '{}', ?)"
        " ON CONFLICT (uid) DO UPDATE SET deleted_at = excluded.deleted_at,"
        " resource_version = CASE WHEN excluded.resource_version > vm_tombstones.resource_version"
        " THEN excluded.resource_version ELSE vm_tombstones.resource_version END",
        (HORIZON_UID, int(newest_pruned), now.isoformat()),
    )
