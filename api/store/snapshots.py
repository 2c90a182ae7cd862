"""QemuVMSnapshot and QemuVMRestore objects in the store (docs/snapshots.md).

The declared objects are published with the instance types (api/store/instancetypes.py keeps
them in the same table, replaced at every publish); this module adds the controller's status of
each, kept apart and keyed by the declared revision: a status written for another revision of
the same name (the spec changed) is not shown, and a new one is written from scratch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from api.instancetypes import revision_of
from api.snapshots import SNAPSHOT_KIND, to_object
from api.store.db import Database
from api.store.errors import NotFound

# Snapshots and restores asked for through the API (not declared in state), per project: each
# holds a row and, for a snapshot, a tag in every disk of its VM until it is deleted.
REQUESTED_PER_PROJECT_MAX = 256


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """A declared snapshot or restore with the controller's status of its current revision."""

    kind: str
    project: str
    name: str
    spec: dict[str, Any]
    error: str | None
    revision: str
    created_at: datetime
    status: dict[str, Any] | None
    # Asked for through the API (`tofu-qemu snapshot`), not declared in state.
    requested: bool = False

    def to_object(self) -> dict[str, Any]:
        return to_object(
            self.kind,
            project=self.project,
            name=self.name,
            spec=self.spec,
            error=self.error,
            status=self.status,
            created_at=self.created_at,
        )


# Declared ones (instance_types, replaced at each publish) first, then requested ones (the API's
# POST .../snapshot and .../restore); a declared name hides a requested one of the same name.
_SELECT = (
    "SELECT t.project, t.name, t.spec, t.spec_error, t.revision, t.created_at, s.revision, s.status, 0"
    " FROM instance_types t LEFT JOIN snapshot_status s"
    " ON s.project = t.project AND s.kind = t.kind AND s.name = t.name WHERE t.kind = ? {where}"
    " UNION ALL SELECT t.project, t.name, t.spec, NULL, t.revision, t.created_at, s.revision, s.status, 1"
    " FROM requested_snapshots t LEFT JOIN snapshot_status s"
    " ON s.project = t.project AND s.kind = t.kind AND s.name = t.name WHERE t.kind = ? {where}"
    " ORDER BY 1, 2, 9"
)


class SnapshotStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def list(self, kind: str, *, project: str | None = None) -> list[SnapshotRecord]:
        """The `kind` objects of one project or all, declared or requested, by project and name."""
        where, params = ("AND t.project = ?", (kind, project)) if project else ("", (kind,))
        rows = await self._db.read(_SELECT.format(where=where), params * 2)
        found: dict[tuple[str, str], SnapshotRecord] = {}
        for row in rows:
            key = (str(row[0]), str(row[1]))
            if key in found:
                continue  # declared in state: Terraform's wins over a request of the same name
            found[key] = SnapshotRecord(
                kind=kind,
                project=key[0],
                name=key[1],
                spec=json.loads(row[2]),
                error=row[3],
                revision=str(row[4]),
                created_at=datetime.fromisoformat(row[5]),
                status=json.loads(row[7]) if row[6] == row[4] and row[7] is not None else None,
                requested=bool(row[8]),
            )
        return list(found.values())

    async def request(
        self, kind: str, project: str, name: str, spec: dict[str, Any], *, by: str, now: datetime
    ) -> None:
        """Record a snapshot or restore asked for through the API.

        :raise NameTaken: one of that kind and name exists in the project already.
        :raise TooManyRequested: the project holds REQUESTED_PER_PROJECT_MAX of them already.
        """
        async with self._db.write() as conn:
            held = await conn.fetchone(
                "SELECT count(*) FROM requested_snapshots WHERE project = ?", (project,)
            )
            if held is not None and int(held[0]) >= REQUESTED_PER_PROJECT_MAX:
                raise TooManyRequested(
                    f"project {project!r} holds {REQUESTED_PER_PROJECT_MAX} snapshots and restores asked for"
                    " through the API, the most it may: delete some first"
                )
            for table in ("instance_types", "requested_snapshots"):
                taken = await conn.fetchone(
                    f"SELECT 1 FROM {table} WHERE project = ? AND kind = ? AND name = ?",  # noqa: S608
                    (project, kind, name),
                )
                if taken is not None:
                    raise NameTaken(f"project {project!r} has a {kind} named {name!r} already")
            await conn.execute(
                "INSERT INTO requested_snapshots (project, kind, name, spec, revision, requested_by,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (project, kind, name, json.dumps(spec), revision_of(spec), by, now.isoformat()),
            )

    async def forget_requested(self, kind: str, project: str, name: str) -> None:
        """Delete a requested snapshot or restore (the controller then deletes its data).

        :raise NotFound: there is none of that name. :raise NameTaken: it is declared in state.
        """
        async with self._db.write() as conn:
            deleted = await conn.execute(
                "DELETE FROM requested_snapshots WHERE project = ? AND kind = ? AND name = ?",
                (project, kind, name),
            )
            if deleted:
                return
            declared = await conn.fetchone(
                "SELECT 1 FROM instance_types WHERE project = ? AND kind = ? AND name = ?",
                (project, kind, name),
            )
        if declared is not None:
            raise NameTaken(f"{kind} {name!r} is declared in project {project!r}'s state: remove it there")
        raise NotFound(f"no {kind} named {name!r} in project {project!r}")

    async def held_mib(self) -> dict[str, int]:
        """MiB of disk that ready snapshots hold, per project (see held_by_snapshots)."""
        return held_by_snapshots(await self.list(SNAPSHOT_KIND))

    async def get(self, kind: str, project: str, name: str) -> SnapshotRecord | None:
        found = [record for record in await self.list(kind, project=project) if record.name == name]
        return found[0] if found else None

    async def write_status(
        self, kind: str, project: str, name: str, revision: str, status: dict[str, Any], now: datetime
    ) -> None:
        async with self._db.write() as conn:
            await conn.execute(
                "INSERT INTO snapshot_status (project, kind, name, revision, status, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (project, kind, name) DO UPDATE SET"
                " revision = excluded.revision, status = excluded.status, updated_at = excluded.updated_at",
                (project, kind, name, revision, json.dumps(status), now.isoformat()),
            )

    async def forget_undeclared(self) -> int:
        """Drop the statuses of objects neither declared nor requested any more; returns how many."""
        async with self._db.write() as conn:
            return await conn.execute(
                "DELETE FROM snapshot_status WHERE NOT EXISTS (SELECT 1 FROM instance_types t"
                " WHERE t.project = snapshot_status.project AND t.kind = snapshot_status.kind"
                " AND t.name = snapshot_status.name) AND NOT EXISTS (SELECT 1 FROM requested_snapshots t"
                " WHERE t.project = snapshot_status.project AND t.kind = snapshot_status.kind"
                " AND t.name = snapshot_status.name)"
            )


def held_by_snapshots(snapshots: list[SnapshotRecord]) -> dict[str, int]:
    """MiB of disk the ready ones among `snapshots` hold, per project. A snapshot may come to pin
    all of its disks' space, so it counts as their virtual size, like a disk, against max_disk_gib."""
    held: dict[str, int] = {}
    for snapshot in snapshots:
        status = snapshot.status or {}
        if status.get("readyToUse"):
            size_mib = -(-int(status.get("sizeBytes", 0)) // (1024 * 1024))
            held[snapshot.project] = held.get(snapshot.project, 0) + size_mib
    return held


class NameTaken(Exception):
    """A snapshot or restore of that name exists, or is Terraform's to change."""


class TooManyRequested(Exception):
    """The project holds REQUESTED_PER_PROJECT_MAX requested snapshots and restores: delete some."""
