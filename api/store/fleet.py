"""Aggregates over the whole store, for metrics: VMs by project and phase, ports, state sizes."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

from api.store.db import Database
from api.store.sql import JSON_STRINGS, Dialect
from api.types import Phase

# VMs by project, phase and liveness, with the sums of their valid specs' memory and cpus. The
# JSON functions differ by engine; the numbers they give are the same.
_VM_GROUPS = {
    Dialect.SQLITE: (
        "SELECT project,"
        " COALESCE(json_extract(status, '$.phase'),"
        "          CASE WHEN spec_error IS NULL THEN ? ELSE ? END) AS phase,"
        " deleted_at IS NULL AS is_live,"
        " COUNT(*),"
        # A VM sized by an instance type has its size in status.instanceType.spec instead.
        " TOTAL(CASE WHEN spec_error IS NOT NULL THEN NULL"
        "       WHEN json_type(spec, '$.memory') = 'integer' THEN json_extract(spec, '$.memory')"
        "       WHEN json_type(status, '$.instanceType.spec.memory') = 'integer'"
        "       THEN json_extract(status, '$.instanceType.spec.memory') END),"
        " TOTAL(CASE WHEN spec_error IS NOT NULL THEN NULL"
        "       WHEN json_type(spec, '$.cpus') = 'integer' THEN json_extract(spec, '$.cpus')"
        "       WHEN json_type(status, '$.instanceType.spec.cpus') = 'integer'"
        "       THEN json_extract(status, '$.instanceType.spec.cpus') END)"
        " FROM vms GROUP BY project, phase, is_live"
    ),
    Dialect.POSTGRESQL: (
        "SELECT project,"
        " COALESCE(status::jsonb ->> 'phase',"
        "          CASE WHEN spec_error IS NULL THEN ? ELSE ? END) AS phase,"
        " deleted_at IS NULL AS is_live,"
        " COUNT(*),"
        # A VM sized by an instance type has its size in status.instanceType.spec instead.
        " COALESCE(SUM(CASE WHEN spec_error IS NULL AND COALESCE(spec::jsonb ->> 'memory',"
        "       status::jsonb #>> '{instanceType,spec,memory}') ~ '^-?[0-9]{1,18}$'"
        "       THEN COALESCE(spec::jsonb ->> 'memory',"
        "                     status::jsonb #>> '{instanceType,spec,memory}')::bigint"
        "       END), 0),"
        " COALESCE(SUM(CASE WHEN spec_error IS NULL AND COALESCE(spec::jsonb ->> 'cpus',"
        "       status::jsonb #>> '{instanceType,spec,cpus}') ~ '^-?[0-9]{1,18}$'"
        "       THEN COALESCE(spec::jsonb ->> 'cpus', status::jsonb #>> '{instanceType,spec,cpus}')::bigint"
        "       END), 0)"
        " FROM vms GROUP BY 1, 2, 3"
    ),
}


@dataclass(frozen=True, slots=True)
class VMGroup:
    """VMs of one project that share a phase and liveness, with their specs' sums."""

    project: str
    phase: str
    is_live: bool
    count: int
    memory_mib: int
    cpus: int


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    vm_groups: list[VMGroup]
    host_ports_in_use: int
    state_bytes: dict[str, int]


async def fleet_snapshot(db: Database) -> FleetSnapshot:
    """Three reads. :raise DatabaseError, StoreUnavailable: a query failed.
    :raise ValueError: the database is closed."""
    # The phase the API shows (vms.render_status): the controller's, else Invalid or Pending.
    # Sums read only valid specs, which are stored normalised (memory in MiB, cpus), and guard
    # the type anyway.
    rows = await db.read(_VM_GROUPS[db.dialect], (Phase.PENDING.value, Phase.INVALID.value))
    ports = await db.read("SELECT COUNT(*) FROM port_allocations")
    sizes = await db.read(
        "SELECT p.name, v.size FROM projects p JOIN state_versions v ON v.id = p.current_version"
    )
    return FleetSnapshot(
        vm_groups=[VMGroup(str(r[0]), str(r[1]), bool(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows],
        host_ports_in_use=int(ports[0][0]),
        state_bytes={str(project): int(size) for project, size in sizes},
    )


@dataclass(frozen=True, slots=True)
class LiveSpec:
    """A VM that may claim resources: not deleting, with a valid (normalised) spec."""

    uid: str
    project: str
    created_at: str
    spec: str


async def admission_version(db: Database) -> tuple[object, ...]:
    """Changes whenever what admission decides on changes, in one read: a VM is created, changes
    spec, starts deleting or is removed; an instance type (or anything else in its table) is
    added, changed or removed; a snapshot's status is written or dropped."""
    rows = await db.read(
        "SELECT (SELECT COUNT(*) FROM vms), (SELECT COALESCE(SUM(generation), 0) FROM vms),"
        " (SELECT COUNT(deleted_at) FROM vms), (SELECT COUNT(*) FROM instance_types),"
        " (SELECT COALESCE(MAX(resource_version), 0) FROM instance_types),"
        " (SELECT COUNT(*) FROM snapshot_status), (SELECT MAX(updated_at) FROM snapshot_status)"
    )
    return tuple(rows[0])


@dataclass(frozen=True, slots=True)
class LiveSpecKey:
    """A live VM's identity and spec generation, without the spec (cheap to read for all)."""

    uid: str
    project: str
    created_at: str
    generation: int


async def live_spec_keys(db: Database) -> list[LiveSpecKey]:
    rows = await db.read(
        "SELECT uid, project, created_at, generation FROM vms WHERE deleted_at IS NULL AND spec_error IS NULL"
    )
    return [LiveSpecKey(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]


async def specs_of(db: Database, uids: Collection[str]) -> dict[str, tuple[int, str]]:
    """The generation and spec of each of `uids` that names a VM with a valid spec, in one read."""
    rows = await db.read(
        "SELECT uid, generation, spec FROM vms WHERE spec_error IS NULL"  # noqa: S608
        f" AND uid IN ({JSON_STRINGS[db.dialect]})",
        (json.dumps(list(uids)),),
    )
    return {str(uid): (int(generation), str(spec)) for uid, generation, spec in rows}


async def live_specs(db: Database) -> list[LiveSpec]:
    rows = await db.read(
        "SELECT uid, project, created_at, spec FROM vms WHERE deleted_at IS NULL AND spec_error IS NULL"
    )
    return [LiveSpec(str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


async def projects_of(db: Database, uids: Collection[str]) -> dict[str, str]:
    """The project of each of `uids` that names a VM (gone ones are left out), in one read."""
    rows = await db.read(
        f"SELECT uid, project FROM vms WHERE uid IN ({JSON_STRINGS[db.dialect]})",  # noqa: S608
        (json.dumps(list(uids)),),
    )
    return {str(uid): str(project) for uid, project in rows}
