"""The columns a QemuVM table shows, one definition for `tofu-qemu get vms` and for the
server-side `Table` that kubectl prints (api/server/kube_tables.py). Pure.

Cells are computed from the served JSON object, so both read the same fields the same way.
`wide` columns are kubectl's priority 1: shown by `-o wide` only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from api.humanize import human_duration

NONE = "<none>"
Cell = Callable[[Mapping[str, Any], datetime], str]


def age(timestamp: str | None, now: datetime) -> str:
    if not timestamp:
        return NONE
    return human_duration(now - datetime.fromisoformat(timestamp))


def condition(vm: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for item in vm.get("status", {}).get("conditions", ()):
        if item.get("type") == type_:
            return item  # type: ignore[no-any-return]
    return None


def ports(vm: Mapping[str, Any]) -> str:
    items = vm.get("status", {}).get("ports", ())
    text = ",".join(f"{p['hostPort']}->{p['guestPort']}/{p['protocol']}" for p in items)
    return text or NONE


def _ready(vm: Mapping[str, Any], _now: datetime) -> str:
    ready = condition(vm, "Ready")
    return str(ready["status"]) if ready else "Unknown"


def _reason(vm: Mapping[str, Any], _now: datetime) -> str:
    ready = condition(vm, "Ready")
    return str((ready["reason"] if ready and ready["status"] != "True" else "") or NONE)


def sized(vm: Mapping[str, Any], field: str) -> object:
    """spec.<field>, or the instance type's when the VM takes it from one (docs/instancetypes.md)."""
    if field in vm.get("spec", {}):
        return vm["spec"][field]
    taken = (vm.get("status") or {}).get("instanceType") or {}
    return taken.get("spec", {}).get(field)


def _memory(vm: Mapping[str, Any], _now: datetime) -> str:
    memory = sized(vm, "memory")
    return f"{memory}Mi" if isinstance(memory, int) else NONE


def _status(field: str) -> Cell:
    return lambda vm, _now: str(vm.get("status", {}).get(field) or NONE)


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    # Kubernetes' column type: string, integer, number, boolean, date.
    type: str
    description: str
    cell: Cell
    wide: bool = False


VM_TABLE_COLUMNS: tuple[Column, ...] = (
    Column("NAME", "string", "metadata.name", lambda vm, _now: str(vm["metadata"]["name"])),
    Column("PROJECT", "string", "The project (namespace)", lambda vm, _now: str(vm["metadata"]["project"])),
    Column("PHASE", "string", "status.phase", _status("phase")),
    Column("READY", "string", "The Ready condition's status", _ready),
    Column("ACCEL", "string", "status.accel: the accelerator in use", _status("accel")),
    Column("PORTS", "string", "Forwarded ports, hostPort->guestPort/protocol", lambda vm, _now: ports(vm)),
    Column(
        "RESTARTS",
        "integer",
        "status.restarts",
        lambda vm, _now: str(vm.get("status", {}).get("restarts", 0)),
    ),
    Column(
        "AGE",
        "string",
        "Time since metadata.creationTimestamp",
        lambda vm, now: age(vm["metadata"].get("creationTimestamp"), now),
    ),
    Column("PID", "integer", "status.pid of the running QEMU", _status("pid"), wide=True),
    Column("CPUS", "integer", "spec.cpus", lambda vm, _now: str(sized(vm, "cpus") or NONE), wide=True),
    Column("MEMORY", "string", "spec.memory", _memory, wide=True),
    Column(
        "GENERATION",
        "string",
        "status.observedGeneration / metadata.generation",
        lambda vm, _now: (
            f"{vm.get('status', {}).get('observedGeneration', 0)}/{vm['metadata']['generation']}"
        ),
        wide=True,
    ),
    Column("REASON", "string", "Why the VM is not Ready", _reason, wide=True),
)


def columns(*, wide: bool) -> tuple[Column, ...]:
    return tuple(column for column in VM_TABLE_COLUMNS if wide or not column.wide)
