"""Instance types and preferences in the Kubernetes-style API (docs/instancetypes.md#the-api):
the namespaced kinds under /apis/tofu-qemu.dev/v1alpha1/namespaces/{project}/..., every
project's under /apis/tofu-qemu.dev/v1alpha1/..., the cluster-wide ones from the settings.
Read-only, like QemuVMs: Terraform (or the config file) owns them.
"""

from __future__ import annotations

from aiohttp import web

from api import kube, openapi
from api.openapi import Op
from api.server.backend import project_of
from api.server.errors import Handler
from api.server.keys import DATABASE, SETTINGS
from api.server.kube import include_object, wants_table
from api.store.errors import NotFound
from api.store.instancetypes import InstanceTypeCatalog, TypeRecord
from api.types import API_VERSION

GROUP_VERSION = "/apis/tofu-qemu.dev/v1alpha1"


def _catalog(request: web.Request) -> InstanceTypeCatalog:
    return InstanceTypeCatalog.of(request.app[DATABASE], request.app[SETTINGS])


def _answer(request: web.Request, kind: str, records: list[TypeRecord]) -> web.StreamResponse:
    objects = [record.to_object() for record in records]
    if wants_table(request):
        columns = kube.type_table_columns(kind)
        return web.json_response(
            kube.table(columns, objects, include=include_object(request), resource_version="")
        )
    listing = {"apiVersion": API_VERSION, "kind": f"{kind}List", "metadata": {}, "items": objects}
    return web.json_response(listing)


def lister(kind: str, *, namespaced: bool) -> Handler:
    """The handler of a list: one project's (`{project}` in the path) or all of them."""

    async def handle(request: web.Request) -> web.StreamResponse:
        project = project_of(request) if namespaced else None
        return _answer(request, kind, await _catalog(request).list(kind, project=project))

    return handle


def getter(kind: str, *, namespaced: bool) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        project = project_of(request) if namespaced else None
        name = request.match_info["name"]
        found = [r for r in await _catalog(request).list(kind, project=project) if r.name == name]
        if not found:
            where = f" in project {project!r}" if project else ""
            raise NotFound(f"no {kind} named {name[:80]!r}{where}")
        if wants_table(request):
            return _answer(request, kind, found)
        return web.json_response(found[0].to_object())

    return handle


RouteSpec = tuple[str, str, Handler, Op]


def route_specs() -> list[RouteSpec]:
    """(method, path, handler, doc) of every route here, for api/server/routes.py."""
    specs: list[RouteSpec] = []
    for resource in kube.TYPE_RESOURCES:
        kind, plural = resource["kind"], resource["name"]
        if resource["namespaced"]:
            scoped = f"{GROUP_VERSION}/namespaces/{{project}}/{plural}"
            specs += [
                (
                    "GET",
                    f"{GROUP_VERSION}/{plural}",
                    lister(kind, namespaced=False),
                    _list_doc(kind, "every"),
                ),
                ("GET", scoped, lister(kind, namespaced=True), _list_doc(kind, "a project's")),
                ("GET", f"{scoped}/{{name}}", getter(kind, namespaced=True), _get_doc(kind)),
            ]
        else:
            specs += [
                ("GET", f"{GROUP_VERSION}/{plural}", lister(kind, namespaced=False), _list_doc(kind, "the")),
                ("GET", f"{GROUP_VERSION}/{plural}/{{name}}", getter(kind, namespaced=False), _get_doc(kind)),
            ]
    return specs


def _list_doc(kind: str, whose: str) -> Op:
    return openapi.kubernetes(f"List {whose} {kind}s (a {kind}List)." + openapi.TABLE_NOTE, errors=(400,))


def _get_doc(kind: str) -> Op:
    return openapi.kubernetes(f"One {kind}, with status.revision", errors=(400, 404))
