"""The values the store hands the controller, and the errors it raises: pure data, no I/O.

Every store implementation (SQLite now, PostgreSQL later) and the in-memory fake speak these, so
the controller and its Protocols (api/store/contracts.py) import nothing that opens a database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from api.types import (
    Condition,
    ConditionStatus,
    ObjectMeta,
    Phase,
    Protocol,
    QemuVM,
    QemuVMStatus,
    ReclaimPolicy,
    RunOverride,
)

ADDRESS_ANNOTATION = "tofu-qemu.dev/terraform-address"
_REASON = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")


@dataclass(frozen=True, slots=True)
class VMRecord:
    """One row of the vms table, decoded."""

    uid: str
    project: str
    name: str
    generation: int
    spec: dict[str, Any]
    spec_error: str | None
    labels: dict[str, str]
    address: str
    created_at: datetime
    spec_changed_at: datetime
    deleted_at: datetime | None
    state_serial: int
    status: dict[str, Any] | None
    resource_version: int
    # W3C traceparent of the write that set this generation (None: written untraced).
    spec_trace: str | None = None
    # Imperative stop/start/restart requests (api/types.py RunOverride), as stored.
    override: dict[str, Any] | None = None
    # The host it is placed on (None: not yet) and why it is not placed, from the scheduler.
    host: str | None = None
    scheduling: str | None = None

    @property
    def run_override(self) -> RunOverride | None:
        return RunOverride.model_validate(self.override) if self.override else None

    def to_object(self) -> QemuVM:
        return QemuVM(
            metadata=ObjectMeta(
                project=self.project,
                name=self.name,
                uid=self.uid,
                generation=self.generation,
                creation_timestamp=self.created_at,
                deletion_timestamp=self.deleted_at,
                labels=self.labels,
                annotations={ADDRESS_ANNOTATION: self.address},
                state_serial=self.state_serial,
                resource_version=str(self.resource_version),
            ),
            spec=self.spec,
            status=render_status(self),
        )


def render_status(record: VMRecord) -> QemuVMStatus:
    """The status to show: the controller's, with the Valid condition the store knows about.

    Validity is decided when the state is written, before any controller has seen the VM, so
    the store supplies that condition until the controller reports its own.
    """
    status = QemuVMStatus.model_validate(record.status) if record.status else QemuVMStatus()
    status = status.model_copy(update={"override": record.run_override, "host": record.host})
    if record.scheduling is not None:
        status = status.model_copy(update={"conditions": (*status.conditions, _placement_condition(record))})
    if any(condition.type == "Valid" for condition in status.conditions) and record.status:
        return status
    valid = Condition(
        type="Valid",
        status=ConditionStatus.FALSE if record.spec_error else ConditionStatus.TRUE,
        reason="InvalidSpec" if record.spec_error else "SpecAccepted",
        message=record.spec_error or "",
        last_transition_time=record.spec_changed_at,
    )
    phase = Phase.INVALID if record.spec_error else status.phase
    return status.model_copy(update={"conditions": (valid, *status.conditions), "phase": phase})


def _placement_condition(record: VMRecord) -> Condition:
    """The scheduler's note (docs/multi-host.md): Scheduled=False with why no host takes an
    unplaced VM; HostReady=False when the host of a placed one is lost (its status is stale)."""
    placed = record.host is not None
    return Condition(
        type="HostReady" if placed else "Scheduled",
        status=ConditionStatus.FALSE,
        reason="HostLost" if placed else "Unschedulable",
        message=record.scheduling or "",
        last_transition_time=record.spec_changed_at,
    )


class StatusConflict(Exception):
    """The object is gone (finalized) or was replaced; re-read and reconcile again."""


class EventType(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to record. Its time is the store clock's when `record` is called."""

    uid: str  # "" for a project-level event (e.g. a force-unlock)
    project: str
    vm_name: str  # "" for a project-level event
    reason: str  # CamelCase: Created, Started, ExitDetected, ...
    message: str
    type: EventType = EventType.NORMAL
    # None: the current OpenTelemetry span's trace id, if there is a valid one.
    trace_id: str | None = None

    def __post_init__(self) -> None:
        """:raise ValueError: a reason that is not CamelCase (a programming error)."""
        if not _REASON.fullmatch(self.reason):
            raise ValueError(f"event reason {self.reason!r} must be CamelCase, at most 64 characters")


class PortTaken(Exception):
    """Another VM holds this host port. Pick another (or report it, if the spec asked for it)."""


@dataclass(frozen=True, slots=True)
class PortRow:
    uid: str
    protocol: Protocol
    guest_port: int
    host_port: int


@dataclass(frozen=True, slots=True)
class DiskOwner:
    """The VM a disk was made for, by name: it outlives the VM's uid when the disk is retained."""

    project: str
    vm_name: str


@dataclass(frozen=True, slots=True)
class DiskRow:
    uid: str
    name: str
    path: str
    reclaim_policy: ReclaimPolicy
    # MiB as created or last grown; None for disks recorded before sizes were kept.
    size_mib: int | None = None
    # The base image file the disk overlays, if any.
    base: str | None = None
    owner: DiskOwner | None = None


class DiskHeld(Exception):
    """A retained disk of this name still belongs to a VM that is being deleted: wait for it."""
