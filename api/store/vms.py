"""QemuVM objects: applying declared specs, and reading objects for the API and controller."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from api.publish import ExistingVM, SpecChanges, diff_specs
from api.store.db import Database, Transaction
from api.store.errors import NotFound
from api.store.events import insert_events, trace_id_of
from api.store.records import ADDRESS_ANNOTATION as ADDRESS_ANNOTATION
from api.store.records import EventType, NewEvent
from api.store.records import VMRecord as VMRecord
from api.store.records import render_status as render_status
from api.tfstate import DeclaredVM
from api.types import RunOverride

VM_COLUMNS = (
    "uid, project, name, generation, spec, spec_error, labels, address, created_at,"
    " spec_changed_at, deleted_at, state_serial, status, resource_version, spec_trace, override,"
    " host, scheduling"
)


async def apply_declared(
    conn: Transaction,
    *,
    project: str,
    declared: tuple[DeclaredVM, ...],
    serial: int | None,
    now: datetime,
    trace: str | None,
) -> SpecChanges:
    """Bring the project's VM objects in line with `declared`, inside the caller's transaction.

    `trace`: the traceparent of the request that wrote these specs, kept with each generation.
    """
    live = await conn.fetchall(
        "SELECT uid, name, spec_hash, address FROM vms WHERE project = ? AND deleted_at IS NULL",
        (project,),
    )
    # By index: unpacking a sqlite3.Row is twice as slow, and a state write reads every live VM.
    existing = tuple(ExistingVM(row[0], row[1], row[2], row[3]) for row in live)
    changes = diff_specs(declared, existing)
    before = await _generations_specs_labels(conn, project) if changes.changed else {}
    # Reserved in one statement; each kind of change is one executemany, not one statement
    # per VM: a 10,000-VM state is published in a few round trips to the database thread.
    versions = await next_resource_versions(conn, _row_writes(changes))
    note = _SpecEvents(project=project, serial=serial, trace_id=trace_id_of(trace))
    writes = _Writes.of(changes, before, note, stamp=now.isoformat(), trace=trace, versions=iter(versions))
    statements = (
        (
            "INSERT INTO vms (uid, project, name, generation, spec_hash, spec, spec_error, labels,"
            " address, created_at, spec_changed_at, state_serial, resource_version, spec_trace)"
            " VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            writes.created,
        ),
        (
            "UPDATE vms SET generation = generation + 1, spec_hash = ?, spec = ?, spec_error = ?,"
            " labels = ?, address = ?, spec_changed_at = ?, state_serial = ?, resource_version = ?,"
            " spec_trace = ? WHERE uid = ?",
            writes.changed,
        ),
        ("UPDATE vms SET address = ?, resource_version = ? WHERE uid = ?", writes.moved),
        (
            "UPDATE vms SET deleted_at = ?, state_serial = COALESCE(?, state_serial),"
            " resource_version = ? WHERE uid = ?",
            writes.deleted,
        ),
    )
    for statement, rows in statements:
        if rows:  # most writes change nothing: no round trip to the database thread for them
            await conn.executemany(statement, rows)
    if writes.events:
        # Recorded in this transaction, so an event exists exactly when its change does.
        await insert_events(conn, writes.events, now=now)
    return changes


Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Writes:
    """The rows and events of one apply_declared, built before any is written."""

    created: list[Row]
    changed: list[Row]
    moved: list[Row]
    deleted: list[Row]
    events: list[NewEvent]

    @classmethod
    def of(
        cls,
        changes: SpecChanges,
        before: dict[str, tuple[int, dict[str, Any], dict[str, str]]],
        note: _SpecEvents,
        *,
        stamp: str,
        trace: str | None,
        versions: Iterator[int],
    ) -> _Writes:
        serial = note.serial
        writes = cls([], [], [], [], [])
        for vm in changes.created:
            uid = str(uuid.uuid4())
            writes.events.extend(note.created(uid, vm))
            head: Row = (uid, note.project, vm.name, vm.spec_hash, json.dumps(vm.spec), vm.error)
            tail = (json.dumps(vm.labels), vm.address, stamp, stamp, serial or 0, next(versions), trace)
            writes.created.append((*head, *tail))
        for current, vm in changes.changed:
            writes.events.extend(note.changed(current.uid, vm, before[current.uid]))
            fields: Row = (vm.spec_hash, json.dumps(vm.spec), vm.error, json.dumps(vm.labels), vm.address)
            writes.changed.append((*fields, stamp, serial or 0, next(versions), trace, current.uid))
        writes.moved.extend((vm.address, next(versions), current.uid) for current, vm in changes.moved)
        for current in changes.deleted:
            writes.events.append(note.deleting(current.uid, current.name))
            writes.deleted.append((stamp, serial, next(versions), current.uid))
        return writes


def _row_writes(changes: SpecChanges) -> int:
    return len(changes.created) + len(changes.changed) + len(changes.moved) + len(changes.deleted)


@dataclass(frozen=True, slots=True)
class _SpecEvents:
    """The events of one apply_declared: what Terraform asked for, at which serial, by which request."""

    project: str
    serial: int | None
    trace_id: str | None

    def created(self, uid: str, vm: DeclaredVM) -> list[NewEvent]:
        message = f"generation 1 from {vm.address}{self._at_serial()}"
        return [self._event(uid, vm.name, "Created", message), *self._invalid(uid, vm)]

    def changed(
        self, uid: str, vm: DeclaredVM, before: tuple[int, dict[str, Any], dict[str, str]]
    ) -> list[NewEvent]:
        generation, spec, labels = before
        fields = [
            f"spec.{key}" for key in sorted(spec.keys() | vm.spec.keys()) if spec.get(key) != vm.spec.get(key)
        ]
        if labels != vm.labels:
            fields.append("metadata.labels")
        what = f": {', '.join(fields)} changed" if fields else ""
        message = f"generation {generation + 1}{what}{self._at_serial()}"
        return [self._event(uid, vm.name, "SpecChanged", message), *self._invalid(uid, vm)]

    def deleting(self, uid: str, name: str) -> NewEvent:
        why = (
            f"removed from the state{self._at_serial()}"
            if self.serial is not None
            else "the state was deleted"
        )
        return self._event(uid, name, "Deleting", f"{why}; releasing its resources")

    def _invalid(self, uid: str, vm: DeclaredVM) -> list[NewEvent]:
        if vm.error is None:
            return []
        return [self._event(uid, vm.name, "InvalidSpec", vm.error, EventType.WARNING)]

    def _at_serial(self) -> str:
        return f" (state serial {self.serial})" if self.serial is not None else ""

    def _event(
        self, uid: str, name: str, reason: str, message: str, type_: EventType = EventType.NORMAL
    ) -> NewEvent:
        return NewEvent(uid, self.project, name, reason, message, type_, self.trace_id)


async def _generations_specs_labels(
    conn: Transaction, project: str
) -> dict[str, tuple[int, dict[str, Any], dict[str, str]]]:
    """What each live object holds before a change, for its SpecChanged event: one query."""
    rows = await conn.fetchall(
        "SELECT uid, generation, spec, labels FROM vms WHERE project = ? AND deleted_at IS NULL",
        (project,),
    )
    return {str(row[0]): (int(row[1]), json.loads(row[2]), json.loads(row[3])) for row in rows}


async def _next_resource_version(conn: Transaction) -> int:
    return (await next_resource_versions(conn, 1))[0]


async def next_resource_versions(conn: Transaction, count: int) -> range:
    """`count` new resource versions, in order, reserved in one statement."""
    if count == 0:
        return range(0)
    row = await conn.fetchone(
        "UPDATE resource_versions SET value = value + ? WHERE id = 1 RETURNING value", (count,)
    )
    assert row is not None
    return range(int(row[0]) - count + 1, int(row[0]) + 1)


class VMStore:
    """Reads of VM objects (the controller's status writes arrive with the controller)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def list_records(self, *, project: str | None = None) -> list[VMRecord]:
        where, params = ("WHERE project = ?", (project,)) if project else ("", ())
        return await self._select(f"{where} ORDER BY project, name, deleted_at IS NOT NULL", params)

    async def get(self, project: str, name: str) -> VMRecord:
        """The live object named `name`, or else the newest one being deleted.

        :raise NotFound: no such VM.
        """
        records = await self._select(
            "WHERE project = ? AND name = ? ORDER BY deleted_at IS NOT NULL, created_at DESC LIMIT 1",
            (project, name),
        )
        if not records:
            raise NotFound(f"project {project!r} has no VM named {name!r}")
        return records[0]

    async def request(
        self, project: str, name: str, action: RunAction, *, by: str, now: datetime
    ) -> VMRecord:
        """Record an imperative stop, start, restart, pause or unpause of the live VM `name`;
        the controller obeys it at its next reconcile. The spec is untouched: Terraform owns it.

        `stop` holds the VM stopped (whatever its runStrategy) until `start`; `restart` asks for
        a graceful restart of the QEMU running now (and, like start, lifts a stop); `pause`
        holds the QEMU running now paused until `unpause` (docs/controller.md, Pause).

        :raise NotFound: no live VM of that name (a VM being deleted takes no requests).
        """
        async with self._db.write() as conn:
            row = await conn.fetchone(
                "SELECT uid, override FROM vms WHERE project = ? AND name = ? AND deleted_at IS NULL",
                (project, name),
            )
            if row is None:
                raise NotFound(f"project {project!r} has no live VM named {name!r}")
            uid = str(row[0])
            current = RunOverride.model_validate(json.loads(row[1])) if row[1] else None
            override = next_override(current, action, by=by, now=now)
            await conn.execute(
                "UPDATE vms SET override = ?, resource_version = ? WHERE uid = ?",
                (override.model_dump_json(by_alias=True), await _next_resource_version(conn), uid),
            )
        records = await self._select("WHERE uid = ?", (uid,))
        return records[0]

    async def _select(self, clause: str, params: tuple[str, ...]) -> list[VMRecord]:
        rows = await self._db.read(f"SELECT {VM_COLUMNS} FROM vms {clause}", params)  # noqa: S608
        return [decode_vm_row(row) for row in rows]


class RunAction(StrEnum):
    STOP = "stop"
    START = "start"
    RESTART = "restart"
    PAUSE = "pause"
    UNPAUSE = "unpause"
    # instancetypes: take the instance type's and preference's current revisions.
    ROLLOUT = "rollout"


def next_override(current: RunOverride | None, action: RunAction, *, by: str, now: datetime) -> RunOverride:
    """The override after `action`: stop sets stopped; start clears it; restart clears it and
    asks for a restart of any QEMU started before `now`. Pause asks for a pause of the QEMU
    running now and unpause lifts it; a rollout asks for the types' current revisions; these three
    leave a stop as it was, and the others leave them."""
    kept = current or RunOverride(updated_at=now)
    asked = {"requested_by": by, "updated_at": now}
    if action in (RunAction.PAUSE, RunAction.UNPAUSE):
        pausing = action is RunAction.PAUSE
        return kept.model_copy(
            update={
                "pause_requested_at": now if pausing else None,
                "unpause_requested_at": kept.unpause_requested_at if pausing else now,
                **asked,
            }
        )
    if action is RunAction.ROLLOUT:
        return kept.model_copy(update={"rollout_requested_at": now, **asked})
    return kept.model_copy(
        update={
            "stopped": action is RunAction.STOP,
            "restart_requested_at": now if action is RunAction.RESTART else kept.restart_requested_at,
            **asked,
        }
    )


def decode_vm_row(row: Any) -> VMRecord:
    return VMRecord(
        uid=row[0],
        project=row[1],
        name=row[2],
        generation=row[3],
        spec=json.loads(row[4]),
        spec_error=row[5],
        labels=json.loads(row[6]),
        address=row[7],
        created_at=datetime.fromisoformat(row[8]),
        spec_changed_at=datetime.fromisoformat(row[9]),
        deleted_at=datetime.fromisoformat(row[10]) if row[10] else None,
        state_serial=row[11],
        status=json.loads(row[12]) if row[12] else None,
        resource_version=row[13],
        spec_trace=row[14],
        override=json.loads(row[15]) if row[15] else None,
        host=row[16],
        scheduling=row[17],
    )
