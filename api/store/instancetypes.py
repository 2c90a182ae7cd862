"""Instance types and preferences in the store (docs/instancetypes.md).

The namespaced ones are declared in a project's state and replaced at each publish, in the
publish's transaction, like the VMs (`apply_declared`); the cluster-wide ones come from the
settings and are never stored. `InstanceTypeCatalog` answers both: the controller asks it for
the content of the types a VM references, the API lists them.

A changed type does not change any VM's spec or generation: the VMs that reference it get a new
resourceVersion only, so the controller looks at them again and marks them InstanceTypeOutdated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from api.instancetypes import CLUSTER_KIND_OF, DeclaredType, Found, Ref, refs_of, revision_of
from api.spec_fields import CLUSTER_INSTANCE_TYPE_KIND, CLUSTER_PREFERENCE_KIND, INSTANCE_TYPE_KIND
from api.store.db import Database, Transaction
from api.store.vms import ADDRESS_ANNOTATION, next_resource_versions
from api.types import API_VERSION

if TYPE_CHECKING:  # api.infra.settings imports the store's URL check
    from api.infra.settings import ProcessSettings

_COLUMNS = (
    "project, kind, name, address, labels, spec, spec_error, revision, generation, created_at,"
    " updated_at, resource_version"
)


@dataclass(frozen=True, slots=True)
class TypeRecord:
    """An instance type or preference as the API shows it. `project` is None for cluster-wide."""

    kind: str
    name: str
    project: str | None
    spec: dict[str, Any]
    error: str | None
    revision: str
    generation: int = 1
    address: str = ""
    labels: Mapping[str, str] | None = None
    created_at: datetime | None = None
    resource_version: int = 0

    def to_object(self) -> dict[str, Any]:
        """The Kubernetes-shaped object (tofu-qemu.dev/v1alpha1)."""
        metadata: dict[str, Any] = {"name": self.name, "generation": self.generation}
        if self.project is not None:
            metadata |= {
                "namespace": self.project,
                "labels": dict(self.labels or {}),
                "annotations": {ADDRESS_ANNOTATION: self.address},
                "resourceVersion": str(self.resource_version),
            }
        if self.created_at is not None:
            metadata["creationTimestamp"] = self.created_at.isoformat().replace("+00:00", "Z")
        valid = {
            "type": "Valid",
            "status": "False" if self.error else "True",
            "reason": "InvalidSpec" if self.error else "SpecAccepted",
            "message": self.error or "",
        }
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": metadata,
            "spec": self.spec,
            "status": {"revision": self.revision, "conditions": [valid]},
        }


async def apply_declared(
    conn: Transaction, *, project: str, declared: tuple[DeclaredType, ...], now: datetime
) -> set[tuple[str, str]]:
    """Make the project's stored types those of `declared`, in the caller's transaction, and
    give the live VMs that reference a changed one a new resourceVersion. Returns the changed
    (kind, name) pairs."""
    rows = await conn.fetchall(
        "SELECT kind, name, revision FROM instance_types WHERE project = ?", (project,)
    )
    stored = {(str(kind), str(name)): str(revision) for kind, name, revision in rows}
    wanted = {(t.kind, t.name): t for t in declared}
    created = [t for key, t in wanted.items() if key not in stored]
    changed = [t for key, t in wanted.items() if key in stored and stored[key] != t.revision]
    removed = [key for key in stored if key not in wanted]
    if not (created or changed or removed):
        return set()
    versions = iter(await next_resource_versions(conn, len(created) + len(changed)))
    stamp = now.isoformat()
    if created:
        await conn.executemany(
            f"INSERT INTO instance_types ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",  # noqa: S608
            [(project, *_fields(t), stamp, stamp, next(versions)) for t in created],
        )
    if changed:
        await conn.executemany(
            "UPDATE instance_types SET address = ?, labels = ?, spec = ?, spec_error = ?, revision = ?,"
            " generation = generation + 1, updated_at = ?, resource_version = ?"
            " WHERE project = ? AND kind = ? AND name = ?",
            [(*_fields(t)[2:], stamp, next(versions), project, t.kind, t.name) for t in changed],
        )
    if removed:
        await conn.executemany(
            "DELETE FROM instance_types WHERE project = ? AND kind = ? AND name = ?",
            [(project, kind, name) for kind, name in removed],
        )
    touched = {(t.kind, t.name) for t in (*created, *changed)} | set(removed)
    await _wake_referencing_vms(conn, project, touched)
    return touched


def _fields(declared: DeclaredType) -> tuple[Any, ...]:
    return (
        declared.kind,
        declared.name,
        declared.address,
        json.dumps(declared.labels),
        json.dumps(declared.spec),
        declared.error,
        declared.revision,
    )


async def _wake_referencing_vms(conn: Transaction, project: str, touched: set[tuple[str, str]]) -> None:
    """A new resourceVersion for each live VM whose valid spec references a touched type: the
    controller queues every object whose resourceVersion moved (controller/sources.py)."""
    rows = await conn.fetchall(
        "SELECT uid, spec FROM vms WHERE project = ? AND deleted_at IS NULL AND spec_error IS NULL",
        (project,),
    )
    uids = []
    for uid, spec in rows:
        refs = refs_of(json.loads(spec))
        if any(ref is not None and (ref.kind, ref.name) in touched for ref in refs):
            uids.append(str(uid))
    if uids:
        versions = await next_resource_versions(conn, len(uids))
        await conn.executemany(
            "UPDATE vms SET resource_version = ? WHERE uid = ?", list(zip(versions, uids, strict=True))
        )


@dataclass(frozen=True, slots=True)
class Size:
    cpus: int
    memory_mib: int


class InstanceTypeSizes(Protocol):
    """What the quota gate needs: every valid instance type's size (api/store/fleet.py
    `admission_version` tells it when they may have changed)."""

    async def instance_type_sizes(self) -> dict[tuple[str | None, Ref], Size]: ...


class InstanceTypeCatalog:
    """Every instance type and preference: the store's namespaced ones and the settings' cluster
    ones (`cluster`: by cluster kind, the normalised specs by name)."""

    def __init__(self, db: Database, cluster: Mapping[str, Mapping[str, dict[str, Any]]]) -> None:
        self._db = db
        self._cluster = cluster

    @classmethod
    def of(cls, db: Database, settings: ProcessSettings) -> InstanceTypeCatalog:
        """The catalog of a server or controller with these settings' cluster-wide types."""
        cluster = {
            CLUSTER_INSTANCE_TYPE_KIND: settings.instance_types,
            CLUSTER_PREFERENCE_KIND: settings.preferences,
        }
        return cls(db, cluster)

    async def lookup(self, project: str, ref: Ref) -> Found | None:
        """The current content of `ref` as a VM of `project` sees it; None: no such type."""
        if ref.kind in CLUSTER_KIND_OF.values():
            spec = self._cluster.get(ref.kind, {}).get(ref.name)
            return Found(spec) if spec is not None else None
        rows = await self._db.read(
            "SELECT spec, spec_error FROM instance_types WHERE project = ? AND kind = ? AND name = ?",
            (project, ref.kind, ref.name),
        )
        return Found(json.loads(rows[0][0]), rows[0][1]) if rows else None

    async def instance_type_sizes(self) -> dict[tuple[str | None, Ref], Size]:
        """Every valid instance type's size, by (project, or None for cluster-wide; reference)."""
        cluster = CLUSTER_INSTANCE_TYPE_KIND
        sizes: dict[tuple[str | None, Ref], Size] = {
            (None, Ref(cluster, name)): Size(spec["cpus"], spec["memory"])
            for name, spec in self._cluster.get(cluster, {}).items()
        }
        for record in await self.list(INSTANCE_TYPE_KIND):
            if record.error is None and record.project is not None:
                sizes[(record.project, Ref(record.kind, record.name))] = Size(
                    record.spec["cpus"], record.spec["memory"]
                )
        return sizes

    async def list(self, kind: str, *, project: str | None = None) -> list[TypeRecord]:
        """The namespaced `kind` of one project or all; a cluster kind from the settings."""
        if kind in CLUSTER_KIND_OF.values():
            return [
                TypeRecord(kind, name, None, spec, None, revision_of(spec))
                for name, spec in sorted(self._cluster.get(kind, {}).items())
            ]
        where, params = ("AND project = ?", (kind, project)) if project else ("", (kind,))
        rows = await self._db.read(
            f"SELECT {_COLUMNS} FROM instance_types WHERE kind = ? {where} ORDER BY project, name",  # noqa: S608
            params,
        )
        return [_record(row) for row in rows]


def _record(row: Any) -> TypeRecord:
    return TypeRecord(
        project=row[0],
        kind=row[1],
        name=row[2],
        address=row[3],
        labels=json.loads(row[4]),
        spec=json.loads(row[5]),
        error=row[6],
        revision=row[7],
        generation=row[8],
        created_at=datetime.fromisoformat(row[9]),
        resource_version=row[11],
    )
