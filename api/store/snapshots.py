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

from api.snapshots import to_object
from api.store.db import Database


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


_SELECT = (
    "SELECT t.project, t.name, t.spec, t.spec_error, t.revision, t.created_at, s.revision, s.status"
    " FROM instance_types t LEFT JOIN snapshot_status s"
    " ON s.project = t.project AND s.kind = t.kind AND s.name = t.name"
)


class SnapshotStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def list(self, kind: str, *, project: str | None = None) -> list[SnapshotRecord]:
        """The declared `kind` objects of one project or all, by project and name."""
        where, params = ("AND t.project = ?", (kind, project)) if project else ("", (kind,))
        query = f"{_SELECT} WHERE t.kind = ? {where} ORDER BY t.project, t.name"
        rows = await self._db.read(query, params)
        return [
            SnapshotRecord(
                kind=kind,
                project=str(row[0]),
                name=str(row[1]),
                spec=json.loads(row[2]),
                error=row[3],
                revision=str(row[4]),
                created_at=datetime.fromisoformat(row[5]),
                status=json.loads(row[7]) if row[6] == row[4] and row[7] is not None else None,
            )
            for row in rows
        ]

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
        """Drop the statuses of objects no state declares any more; returns how many."""
        async with self._db.write() as conn:
            return await conn.execute(
                "DELETE FROM snapshot_status WHERE NOT EXISTS (SELECT 1 FROM instance_types t"
                " WHERE t.project = snapshot_status.project AND t.kind = snapshot_status.kind"
                " AND t.name = snapshot_status.name)"
            )
