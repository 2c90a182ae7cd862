"""Snapshots and restores in the read API and the Kubernetes-style API (docs/snapshots.md#the-api).

Read-only, like QemuVMs: Terraform owns the objects, the controller their status. The read
API (/api/v1/projects/{project}/snapshots, .../restores) and the Kubernetes-shaped one
(qemuvmsnapshots, qemuvmrestores beside qemuvms) answer the same objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from api import kube, openapi
from api.kube import TableColumn
from api.openapi import Op
from api.server.backend import project_of
from api.server.errors import Handler
from api.server.keys import DATABASE
from api.server.kube import include_object, wants_table
from api.snapshots import RESTORE_KIND, SNAPSHOT_KIND
from api.store.errors import NotFound
from api.store.snapshots import SnapshotRecord, SnapshotStore
from api.types import API_VERSION

GROUP_VERSION = "/apis/tofu-qemu.dev/v1alpha1"
API = "/api/v1"
# (plural in the Kubernetes API, path in the read API, kind)
_RESOURCES = (
    ("qemuvmsnapshots", "snapshots", SNAPSHOT_KIND),
    ("qemuvmrestores", "restores", RESTORE_KIND),
)


def _status(obj: Mapping[str, Any]) -> Any:
    return obj.get("status", {})


def table_columns(kind: str) -> list[TableColumn]:
    """`kubectl get qemuvmsnapshots` / `qemuvmrestores`."""
    name = TableColumn(
        "Name", "string", "The object's name", lambda obj: obj["metadata"]["name"], format="name"
    )
    error = TableColumn("Error", "string", "status.error", lambda obj: _status(obj).get("error") or "<none>")
    if kind == SNAPSHOT_KIND:
        return [
            name,
            TableColumn("Source", "string", "spec.source.name", lambda obj: obj["spec"]["source"]["name"]),
            TableColumn("ReadyToUse", "boolean", "status.readyToUse", lambda obj: _status(obj)["readyToUse"]),
            TableColumn(
                "CreationTime", "string", "status.creationTime", lambda o: _status(o)["creationTime"]
            ),
            error,
        ]
    return [
        name,
        TableColumn("Target", "string", "spec.target.name", lambda obj: obj["spec"]["target"]["name"]),
        TableColumn("Snapshot", "string", "spec.snapshot", lambda obj: obj["spec"]["snapshot"]),
        TableColumn("Complete", "boolean", "status.complete", lambda obj: _status(obj)["complete"]),
        error,
    ]


def _answer(request: web.Request, kind: str, records: list[SnapshotRecord]) -> web.StreamResponse:
    objects = [record.to_object() for record in records]
    if wants_table(request):
        table = kube.table(table_columns(kind), objects, include=include_object(request), resource_version="")
        return web.json_response(table)
    return web.json_response(
        {"apiVersion": API_VERSION, "kind": f"{kind}List", "metadata": {}, "items": objects}
    )


def lister(kind: str, *, namespaced: bool) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        project = project_of(request) if namespaced else None
        return _answer(request, kind, await SnapshotStore(request.app[DATABASE]).list(kind, project=project))

    return handle


def getter(kind: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        project, name = project_of(request), request.match_info["name"]
        found = await SnapshotStore(request.app[DATABASE]).get(kind, project, name)
        if found is None:
            raise NotFound(f"no {kind} named {name[:80]!r} in project {project!r}")
        if wants_table(request):
            return _answer(request, kind, [found])
        return web.json_response(found.to_object())

    return handle


RouteSpec = tuple[str, str, Handler, Op]


def route_specs() -> list[RouteSpec]:
    """(method, path, handler, doc) of every route here, for api/server/routes.py."""
    specs: list[RouteSpec] = []
    for plural, path, kind in _RESOURCES:
        scoped = f"{GROUP_VERSION}/namespaces/{{project}}/{plural}"
        read = f"{API}/projects/{{project}}/{path}"
        specs += [
            ("GET", f"{GROUP_VERSION}/{plural}", lister(kind, namespaced=False), _list_doc(kind, "every")),
            ("GET", scoped, lister(kind, namespaced=True), _list_doc(kind, "a project's")),
            ("GET", f"{scoped}/{{name}}", getter(kind), _get_doc(kind)),
            ("GET", read, lister(kind, namespaced=True), openapi.read(f"A project's {kind}s, with status")),
            ("GET", f"{read}/{{name}}", getter(kind), openapi.read(f"One {kind}, with status")),
        ]
    return specs


async def snapshot_disk_items(request: web.Request, project: str | None) -> list[dict[str, Any]]:
    """The snapshots' data as GET /api/v1/disks lists it: the space each one holds alone."""
    items = []
    for record in await SnapshotStore(request.app[DATABASE]).list(SNAPSHOT_KIND, project=project):
        status = record.status or {}
        if not status.get("readyToUse"):
            continue
        items.append(
            {
                "name": f"snapshot/{record.name}",
                "project": record.project,
                "vm": record.spec.get("source", {}).get("name"),
                "uid": status.get("sourceUid"),
                "sizeMiB": -(-int(status.get("sizeBytes", 0)) // (1024 * 1024)),
                "snapshot": record.name,
                "disks": status.get("disks", []),
            }
        )
    return items


def _list_doc(kind: str, whose: str) -> Op:
    return openapi.kubernetes(f"List {whose} {kind}s (a {kind}List)." + openapi.TABLE_NOTE, errors=(400,))


def _get_doc(kind: str) -> Op:
    return openapi.kubernetes(f"One {kind}, with status.readyToUse or status.complete", errors=(400, 404))
