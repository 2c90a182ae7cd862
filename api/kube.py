"""What real Kubernetes clients (kubectl, client-go, k9s) need besides the QemuVM objects: the
discovery documents, server-side `Table`s, core/v1 `Namespace`s and `Event`s, field selectors.
Pure: the handlers in api/server/kube.py fetch, these functions shape.

Names and shapes follow k8s.io/apimachinery's meta/v1 and k8s.io/api's core/v1, the subset that
kubectl reads; every document says only what tofu-qemu really serves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from api import crd
from api.snapshots import RESTORE_KIND, SNAPSHOT_KIND
from api.spec_fields import (
    CLUSTER_INSTANCE_TYPE_KIND,
    CLUSTER_PREFERENCE_KIND,
    INSTANCE_TYPE_KIND,
    PREFERENCE_KIND,
)
from api.types import API_GROUP, API_VERSION, KIND
from api.vm_columns import Column, age

Json = dict[str, Any]
META_V1 = "meta.k8s.io/v1"
# QemuVMs are read-only to Kubernetes clients: their specs are Terraform's.
QEMUVM_VERBS = ("get", "list", "watch")
WRITES_REFUSED = "QemuVM specs come from Terraform state; change them with tofu apply"
# The Kubernetes minor version whose API this server's subset follows (kubectl's skew warnings).
KUBERNETES_VERSION = ("1", "32")
EVENT_SOURCE = "tofu-qemu"


# ---- Discovery ---------------------------------------------------------------------------------


def version_info(server_version: str) -> Json:
    major, minor = KUBERNETES_VERSION
    return {
        "major": major,
        "minor": minor,
        "gitVersion": f"v{major}.{minor}.0+tofu-qemu.{server_version}",
        "platform": "linux/amd64",
    }


def api_versions() -> Json:
    """GET /api: the legacy core group has one version."""
    return {"kind": "APIVersions", "apiVersion": "v1", "versions": ["v1"], "serverAddressByClientCIDRs": []}


def api_group() -> Json:
    version = {"groupVersion": API_VERSION, "version": crd.VERSION}
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": API_GROUP,
        "versions": [version],
        "preferredVersion": version,
    }


def api_group_list() -> Json:
    """GET /apis: the one group tofu-qemu serves."""
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group()]}


def qemuvm_resources() -> Json:
    """GET /apis/tofu-qemu.dev/v1alpha1."""
    resource = {
        "name": crd.PLURAL,
        "singularName": crd.SINGULAR,
        "namespaced": True,
        "kind": KIND,
        "verbs": list(QEMUVM_VERBS),
        "shortNames": list(crd.SHORT_NAMES),
        "categories": ["all"],
    }
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": API_VERSION,
        "resources": [resource, *TYPE_RESOURCES, *SNAPSHOT_RESOURCES],
    }


# instancetypes: the kinds beside qemuvms (docs/instancetypes.md#the-api), read-only.
TYPE_RESOURCES: tuple[Json, ...] = tuple(
    {"name": plural, "singularName": plural.removesuffix("s"), "namespaced": namespaced, "kind": kind,
     "verbs": ["get", "list"], "shortNames": [short], "categories": []}
    for plural, short, namespaced, kind in (
        ("qemuinstancetypes", "qit", True, INSTANCE_TYPE_KIND),
        ("qemupreferences", "qpref", True, PREFERENCE_KIND),
        ("qemuclusterinstancetypes", "qcit", False, CLUSTER_INSTANCE_TYPE_KIND),
        ("qemuclusterpreferences", "qcpref", False, CLUSTER_PREFERENCE_KIND),
    )
)  # fmt: skip
# snapshots: QemuVMSnapshot and QemuVMRestore (docs/snapshots.md#the-api), read-only.
SNAPSHOT_RESOURCES: tuple[Json, ...] = tuple(
    {"name": plural, "singularName": plural.removesuffix("s"), "namespaced": True, "kind": kind,
     "verbs": ["get", "list"], "shortNames": [short], "categories": []}
    for plural, short, kind in (
        ("qemuvmsnapshots", "vmsnap", SNAPSHOT_KIND),
        ("qemuvmrestores", "vmrestore", RESTORE_KIND),
    )
)  # fmt: skip


def type_table_columns(kind: str) -> list[TableColumn]:
    """`kubectl get qemuinstancetypes` and the others: name, what it sets, its revision."""
    spec: Callable[[Mapping[str, Any]], Mapping[str, Any]] = lambda obj: obj.get("spec", {})  # noqa: E731
    columns = [
        TableColumn("Name", "string", "The type's name", lambda obj: obj["metadata"]["name"], format="name")
    ]
    if kind in (INSTANCE_TYPE_KIND, CLUSTER_INSTANCE_TYPE_KIND):
        columns += [
            TableColumn("CPUs", "integer", "spec.cpus", lambda obj: spec(obj).get("cpus", "<none>")),
            TableColumn(
                "Memory", "string", "spec.memory (MiB)", lambda obj: f"{spec(obj).get('memory', 0)}Mi"
            ),
        ]
    else:
        columns.append(
            TableColumn(
                "Sets", "string", "The defaults it gives", lambda obj: ",".join(sorted(spec(obj))) or "<none>"
            )
        )
    columns.append(
        TableColumn("Revision", "string", "status.revision", lambda obj: obj["status"]["revision"])
    )
    valid = lambda obj: obj["status"]["conditions"][0]["message"] or "<none>"  # noqa: E731
    columns.append(TableColumn("Error", "string", "Why it is invalid", valid, priority=1))
    return columns


def core_resources() -> Json:
    """GET /api/v1: the two core resources tofu-qemu serves, read-only."""
    read = ["get", "list"]
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "v1",
        "resources": [
            {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace",
             "verbs": read, "shortNames": ["ns"]},
            {"name": "events", "singularName": "event", "namespaced": True, "kind": "Event",
             "verbs": read, "shortNames": ["ev"]},
        ],
    }  # fmt: skip


# ---- Tables ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableColumn:
    name: str
    type: str
    description: str
    cell: Callable[[Mapping[str, Any]], object]
    priority: int = 0
    format: str = ""


def vm_table_columns(columns: Sequence[Column], now: datetime) -> list[TableColumn]:
    """The `tofu-qemu get vms` columns, but PROJECT: kubectl shows it as NAMESPACE with -A."""
    return [
        TableColumn(
            column.header.title() if column.header != "CPUS" else "CPUs",
            column.type,
            column.description,
            lambda vm, cell=column.cell: cell(vm, now),  # type: ignore[misc]
            priority=1 if column.wide else 0,
            format="name" if column.header == "NAME" else "",
        )
        for column in columns
        if column.header != "PROJECT"
    ]


def table(
    columns: Sequence[TableColumn],
    objects: Iterable[Mapping[str, Any]],
    *,
    include: str,
    resource_version: str,
) -> Json:
    """A meta.k8s.io/v1 Table; `include` is the request's includeObject (None, Metadata, Object)."""
    return {
        "kind": "Table",
        "apiVersion": META_V1,
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": [
            {
                "name": c.name,
                "type": c.type,
                "format": c.format,
                "description": c.description,
                "priority": c.priority,
            }
            for c in columns
        ],
        "rows": [_row(columns, obj, include) for obj in objects],
    }


def _row(columns: Sequence[TableColumn], obj: Mapping[str, Any], include: str) -> Json:
    row: Json = {"cells": [column.cell(obj) for column in columns]}
    if include == "Object":
        row["object"] = dict(obj)
    elif include == "Metadata":
        row["object"] = {
            "kind": "PartialObjectMetadata",
            "apiVersion": META_V1,
            "metadata": obj.get("metadata", {}),
        }
    return row


# ---- core/v1 ----------------------------------------------------------------------------------


def namespace(name: str) -> Json:
    """A project as a Namespace. Projects have no creation time in the store: none is claimed."""
    return {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {"name": name, "uid": f"project-{name}", "labels": {"kubernetes.io/metadata.name": name}},
        "spec": {},
        "status": {"phase": "Active"},
    }


NAMESPACE_COLUMNS = (
    TableColumn("Name", "string", "The project", lambda ns: ns["metadata"]["name"], format="name"),
    TableColumn("Status", "string", "Always Active", lambda ns: ns["status"]["phase"]),
)


@dataclass(frozen=True, slots=True)
class EventFacts:
    """One event of the log, as api/store/events.py records it."""

    id: int
    uid: str
    project: str
    vm_name: str
    time: datetime
    type: str
    reason: str
    message: str


def core_event(event: EventFacts) -> Json:
    """The event as a core/v1 Event about its QemuVM (or, for a project's own events such as
    ForceUnlocked, about the project's Namespace)."""
    about_vm = bool(event.vm_name)
    involved = (
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": event.vm_name,
            "namespace": event.project,
            "uid": event.uid,
        }
        if about_vm
        else {"apiVersion": "v1", "kind": "Namespace", "name": event.project}
    )
    stamp = event.time.isoformat().replace("+00:00", "Z")
    return {
        "kind": "Event",
        "apiVersion": "v1",
        "metadata": {
            "name": f"{event.vm_name or event.project}.{event.id:x}",
            "namespace": event.project,
            "uid": f"event-{event.id}",
            "resourceVersion": str(event.id),
            "creationTimestamp": stamp,
        },
        "involvedObject": involved,
        "reason": event.reason,
        "message": event.message,
        "type": event.type,
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "source": {"component": EVENT_SOURCE},
        "reportingComponent": EVENT_SOURCE,
    }


def event_table_columns(now: datetime) -> list[TableColumn]:
    """The columns of `kubectl get events`."""

    def involved(event: Mapping[str, Any]) -> str:
        target = event["involvedObject"]
        return f"{str(target['kind']).lower()}/{target['name']}"

    return [
        TableColumn("Last Seen", "string", "Time since the event", lambda e: age(e["lastTimestamp"], now)),
        TableColumn("Type", "string", "Normal or Warning", lambda e: e["type"]),
        TableColumn("Reason", "string", "Why", lambda e: e["reason"]),
        TableColumn("Object", "string", "What it is about", involved),
        TableColumn("Message", "string", "What happened", lambda e: e["message"]),
    ]


def list_of(kind: str, items: Sequence[Json], *, resource_version: str = "") -> Json:
    return {"kind": f"{kind}List", "apiVersion": "v1", "metadata": {"resourceVersion": resource_version},
            "items": list(items)}  # fmt: skip


# ---- Field selectors --------------------------------------------------------------------------


class FieldSelectorError(ValueError):
    """A field selector that cannot be parsed or names a field the resource cannot select on."""


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    field: str
    value: str
    equal: bool


@dataclass(frozen=True, slots=True)
class FieldSelector:
    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, fields: Mapping[str, str]) -> bool:
        return all((fields.get(r.field, "") == r.value) == r.equal for r in self.requirements)

    def value_of(self, field: str) -> str | None:
        """The value an `=` requirement asks `field` to have, if any."""
        return next((r.value for r in self.requirements if r.field == field and r.equal), None)


FIELD_SELECTOR_MAX = 4096


def parse_field_selector(text: str, allowed: Iterable[str]) -> FieldSelector:
    """`a=b,c!=d` (also `==`), as Kubernetes accepts it; fields outside `allowed` are refused
    with Kubernetes' own message."""
    if len(text) > FIELD_SELECTOR_MAX:
        raise FieldSelectorError(f"field selector: at most {FIELD_SELECTOR_MAX} characters")
    known = frozenset(allowed)
    requirements = []
    for term in filter(None, (part.strip() for part in text.split(","))):
        requirement = _field_requirement(term)
        if requirement.field not in known:
            raise FieldSelectorError(f"field label not supported: {requirement.field[:80]}")
        requirements.append(requirement)
    return FieldSelector(tuple(requirements))


def _field_requirement(term: str) -> FieldRequirement:
    for operator, equal in (("!=", False), ("==", True), ("=", True)):
        field, sep, value = term.partition(operator)
        if sep:
            return FieldRequirement(field.strip(), value.strip(), equal)
    raise FieldSelectorError(f"invalid selector: {term[:80]!r}; can't understand {term[:80]!r}")


QEMUVM_FIELDS = ("metadata.name", "metadata.namespace")
EVENT_FIELDS = (
    "metadata.name", "metadata.namespace", "involvedObject.name", "involvedObject.namespace",
    "involvedObject.uid", "involvedObject.kind", "involvedObject.apiVersion", "reason", "type",
    "involvedObject.resourceVersion", "involvedObject.fieldPath", "source", "reportingComponent",
)  # fmt: skip


def event_fields(event: Mapping[str, Any]) -> dict[str, str]:
    target = event["involvedObject"]
    return {
        "metadata.name": event["metadata"]["name"],
        "metadata.namespace": event["metadata"]["namespace"],
        "involvedObject.name": target.get("name", ""),
        "involvedObject.namespace": target.get("namespace", ""),
        "involvedObject.uid": target.get("uid", ""),
        "involvedObject.kind": target.get("kind", ""),
        "involvedObject.apiVersion": target.get("apiVersion", ""),
        "reason": event["reason"],
        "type": event["type"],
        "source": EVENT_SOURCE,
        "reportingComponent": EVENT_SOURCE,
    }
