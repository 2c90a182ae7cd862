"""The reconciler's side of instance types and preferences (docs/instancetypes.md).

`resolve_record` reads the current content of the types a VM references (through the
`InstanceTypeSource` Protocol) and resolves its effective spec against the revisions its status
keeps (api/instancetypes.py `resolve`, pure). `stamp` writes the revisions and the
InstanceTypeOutdated condition into the status compute_status made. The plan never hears of
types: it sees the effective spec, and restarts only when the argv that spec gives changed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from api.instancetypes import OUTDATED_CONDITION, Found, Ref, Resolution, Wanted, refs_of, resolve
from api.store.records import VMRecord
from api.types import Condition, ConditionStatus, FrozenRevision, QemuVMStatus
from controller.events import VMEvent


class InstanceTypeSource(Protocol):
    """The current content of instance types and preferences (api/store/instancetypes.py)."""

    async def lookup(self, project: str, ref: Ref) -> Found | None: ...


class NoInstanceTypes:
    """A source that knows no type: every reference is reported as not found."""

    async def lookup(self, project: str, ref: Ref) -> Found | None:
        return None


async def resolve_record(
    record: VMRecord, previous: QemuVMStatus, source: InstanceTypeSource, now: datetime
) -> Resolution | None:
    """The resolution of a live, valid VM that references a type or preference; else None
    (its stored spec is the effective one)."""
    if record.spec_error is not None or record.deleted_at is not None:
        return None
    refs = [ref for ref in refs_of(record.spec) if ref is not None]
    if not refs:
        return None
    current = {ref: await source.lookup(record.project, ref) for ref in refs}
    override = record.run_override
    wanted = Wanted(
        project=record.project,
        vm_spec=record.spec,
        generation=record.generation,
        frozen_type=previous.instance_type,
        frozen_preference=previous.preference,
        rollout_requested_at=override.rollout_requested_at if override else None,
    )
    return resolve(wanted, current, now)


def references_types(record: VMRecord | None) -> bool:
    return record is not None and any(ref is not None for ref in refs_of(record.spec))


def stamp(
    status: QemuVMStatus,
    previous: QemuVMStatus,
    resolution: Resolution | None,
    *,
    references: bool,
    now: datetime,
) -> QemuVMStatus:
    """`status` (as compute_status made it) with the revisions the VM runs and, when it
    references a type, whether a newer revision waits: InstanceTypeOutdated, whose time moves
    only when it flips. With no resolution (an invalid or deleting VM) the kept ones stay."""
    others = tuple(c for c in status.conditions if c.type != OUTDATED_CONDITION)
    old = next((c for c in previous.conditions if c.type == OUTDATED_CONDITION), None)
    if not references:
        return status.model_copy(update={"instance_type": None, "preference": None, "conditions": others})
    if resolution is None:
        kept = (old,) if old is not None else ()
        update = {"instance_type": previous.instance_type, "preference": previous.preference}
        return status.model_copy(update={**update, "conditions": (*others, *kept)})
    outdated = bool(resolution.outdated)
    flag = ConditionStatus.TRUE if outdated else ConditionStatus.FALSE
    condition = Condition(
        type=OUTDATED_CONDITION,
        status=flag,
        reason="NewRevisionAvailable" if outdated else "UpToDate",
        message="; ".join(resolution.outdated) + ("; `tofu-qemu rollout` takes it" if outdated else ""),
        last_transition_time=old.last_transition_time if old is not None and old.status == flag else now,
    )
    return status.model_copy(
        update={
            "instance_type": resolution.instance_type,
            "preference": resolution.preference,
            "conditions": (*others, condition),
        }
    )


def revision_events(before: QemuVMStatus, after: QemuVMStatus) -> list[VMEvent]:
    """RevisionTaken when the VM moves to another revision of a type or preference, and
    InstanceTypeOutdated when a newer one starts waiting (docs/instancetypes.md#revisions)."""
    events = [
        VMEvent("RevisionTaken", _taken_message(new))
        for old, new in ((before.instance_type, after.instance_type), (before.preference, after.preference))
        if new is not None
        and (old is None or (old.kind, old.name, old.revision) != (new.kind, new.name, new.revision))
    ]
    old = next((c for c in before.conditions if c.type == OUTDATED_CONDITION), None)
    new = next((c for c in after.conditions if c.type == OUTDATED_CONDITION), None)
    if (
        new is not None
        and new.status is ConditionStatus.TRUE
        and (old is None or old.status is not ConditionStatus.TRUE)
    ):
        events.append(VMEvent(OUTDATED_CONDITION, new.message))
    return events


def _taken_message(revision: FrozenRevision) -> str:
    content = ", ".join(
        f"{key} {value}" for key, value in sorted(revision.spec.items()) if key != "cloudInit"
    )
    return f"{revision.kind} {revision.name!r} revision {revision.revision}" + (
        f" ({content})" if content else ""
    )
