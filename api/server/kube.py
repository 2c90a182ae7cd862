"""The routes real Kubernetes clients need besides the QemuVM objects (docs/kubectl.md):
/version, discovery (/api, /api/v1, /apis, /apis/tofu-qemu.dev[/v1alpha1]), projects as core/v1
Namespaces, the event log as core/v1 Events, OpenAPI v3 for `kubectl explain`, and the 405
every write of a QemuVM gets.

Discovery is served in the legacy format only. kubectl asks for the aggregated format first
(`Accept: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,...,
application/json`); a plain `application/json` answer tells client-go the server has none, and
it reads the per-group documents instead, as it does with any pre-1.26 apiserver.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from typing import Any

from aiohttp import web

from api import crd, kube
from api.server import params
from api.server.backend import project_of
from api.server.errors import BadRequest, status_response
from api.server.events import event_log_of
from api.server.keys import DATABASE, STATES
from api.store.events import LIST_LIMIT_MAX, EventRecord, EventType
from api.types import API_GROUP, API_VERSION, KIND


def _server_version() -> str:
    try:
        return importlib.metadata.version("tofu-qemu")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


SERVER_VERSION = _server_version()
OPENAPI_V3_GROUP_PATH = f"apis/{API_VERSION}"
OPENAPI_V3_ROOT = "/openapi/v3"
# kubectl describe pages events 500 at a time; the event log's own list limit caps it.
EVENTS_LIMIT_DEFAULT = 500
TABLE_PROFILE = "as=table"


def wants_table(request: web.Request) -> bool:
    """The client asked for a server-side meta.k8s.io Table (kubectl get does)."""
    for media_range in request.headers.get("Accept", "").split(","):
        parameters = {part.strip().lower() for part in media_range.split(";")[1:]}
        if TABLE_PROFILE in parameters and "g=meta.k8s.io" in parameters:
            return True
    return False


def include_object(request: web.Request) -> str:
    value = request.query.get("includeObject", "") or "Metadata"
    if value not in ("None", "Metadata", "Object"):
        raise BadRequest(f"includeObject must be None, Metadata or Object, not {value[:40]!r}")
    return value


def _json(body: dict[str, Any]) -> web.Response:
    return web.json_response(body)


async def version(request: web.Request) -> web.StreamResponse:
    return _json(kube.version_info(SERVER_VERSION))


async def api_versions(request: web.Request) -> web.StreamResponse:
    return _json(kube.api_versions())


async def core_resources(request: web.Request) -> web.StreamResponse:
    return _json(kube.core_resources())


async def api_groups(request: web.Request) -> web.StreamResponse:
    return _json(kube.api_group_list())


async def api_group(request: web.Request) -> web.StreamResponse:
    return _json(kube.api_group())


async def qemuvm_resources(request: web.Request) -> web.StreamResponse:
    return _json(kube.qemuvm_resources())


async def writes_refused(request: web.Request) -> web.StreamResponse:
    """POST, PUT, PATCH and DELETE of QemuVMs (kubectl create, apply, edit, delete, patch)."""
    return status_response(405, kube.WRITES_REFUSED, headers={"Allow": "GET"})


# ---- Namespaces and events ------------------------------------------------------------------


async def list_namespaces(request: web.Request) -> web.StreamResponse:
    projects = await request.app[STATES].list_projects()
    items = [kube.namespace(project.name) for project in projects]
    if wants_table(request):
        return _json(
            kube.table(kube.NAMESPACE_COLUMNS, items, include=include_object(request), resource_version="")
        )
    return _json(kube.list_of("Namespace", items))


async def get_namespace(request: web.Request) -> web.StreamResponse:
    project = await request.app[STATES].project(project_of(request))
    item = kube.namespace(project.name)
    if wants_table(request):
        return _json(
            kube.table(kube.NAMESPACE_COLUMNS, [item], include=include_object(request), resource_version="")
        )
    return _json(item)


def _core_event(record: EventRecord) -> dict[str, Any]:
    kind = "Warning" if record.type is EventType.WARNING else "Normal"
    facts = kube.EventFacts(
        record.id,
        record.uid,
        record.project,
        record.vm_name,
        record.time,
        kind,
        record.reason,
        record.message,
    )
    return kube.core_event(facts)


async def list_events(request: web.Request) -> web.StreamResponse:
    """A project's event log as core/v1 Events, oldest first, filtered by `fieldSelector`
    (kubectl describe asks for involvedObject.name, namespace, kind and uid)."""
    project = project_of(request)
    try:
        selector = kube.parse_field_selector(request.query.get("fieldSelector", ""), kube.EVENT_FIELDS)
    except kube.FieldSelectorError as err:
        raise BadRequest(str(err)) from err
    limit = params.integer(request, "limit", default=EVENTS_LIMIT_DEFAULT, minimum=1, maximum=2**31)
    records = await event_log_of(request.app).list(
        project=project,
        vm_name=selector.value_of("involvedObject.name"),
        uid=selector.value_of("involvedObject.uid"),
        limit=min(limit, LIST_LIMIT_MAX),
    )
    events = [event for event in map(_core_event, records) if selector.matches(kube.event_fields(event))]
    version = str(records[-1].id) if records else "0"
    if wants_table(request):
        columns = kube.event_table_columns(request.app[DATABASE].clock())
        return _json(kube.table(columns, events, include=include_object(request), resource_version=version))
    return _json(kube.list_of("Event", events, resource_version=version))


# ---- OpenAPI v3 -------------------------------------------------------------------------------


@functools.cache
def _group_document() -> tuple[bytes, str]:
    """The group's OpenAPI v3 document and its hash (clients cache it by the hash in the URL)."""
    body = json.dumps(_openapi_v3(), sort_keys=True, separators=(",", ":")).encode()
    return body, hashlib.sha256(body).hexdigest()[:32].upper()


def _openapi_v3() -> dict[str, Any]:
    """The QemuVM schema exactly as in crds/qemuvm.yaml (api/crd.py), named and tagged the way
    kubectl explain looks schemas up: by x-kubernetes-group-version-kind."""
    gvk = [{"group": API_GROUP, "version": crd.VERSION, "kind": KIND}]
    name = f"dev.tofu-qemu.{crd.VERSION}.{KIND}"
    list_gvk = [{**gvk[0], "kind": crd.LIST_KIND}]
    return {
        "openapi": "3.0.0",
        "info": {"title": "tofu-qemu", "version": crd.VERSION},
        "paths": _openapi_v3_paths(name, gvk[0]),
        "components": {
            "schemas": {
                name: {**crd.open_api_v3_schema(), "x-kubernetes-group-version-kind": gvk},
                f"{name}List": {
                    "type": "object",
                    "description": "A list of QemuVMs",
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{name}"}},
                    },
                    "required": ["items"],
                    "x-kubernetes-group-version-kind": list_gvk,
                },
            }
        },
    }


def _openapi_v3_paths(schema: str, gvk: dict[str, str]) -> dict[str, Any]:
    """The paths, tagged with the kind they serve: kubectl explain finds a resource's kind
    through them. The writes are listed (with the fieldValidation parameter, so that kubectl
    validates on the server instead of asking for OpenAPI v2) to say that they are refused."""
    namespaced = f"/apis/{API_VERSION}/namespaces/{{namespace}}/{crd.PLURAL}"
    status = {"content": {"application/json": {"schema": {"type": "object"}}}}
    refused = {"405": {"description": f"Refused: {kube.WRITES_REFUSED}", **status}}
    validation = [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]

    def operation(action: str, model: str | None) -> dict[str, Any]:
        ok = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}}
        responses = {"200": {"description": "OK", **ok}} if model else refused
        extra = {} if model else {"parameters": validation}
        return {
            "responses": responses,
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk,
            **extra,
        }

    listed = operation("list", f"{schema}List")
    return {
        f"/apis/{API_VERSION}/{crd.PLURAL}": {"get": listed},
        namespaced: {
            "get": listed,
            "post": operation("post", None),
            "delete": operation("deletecollection", None),
        },
        f"{namespaced}/{{name}}": {
            "get": operation("get", schema),
            **{method: operation(method, None) for method in ("put", "patch", "delete")},
        },
    }


async def openapi_v3_index(request: web.Request) -> web.StreamResponse:
    _, digest = _group_document()
    url = f"{OPENAPI_V3_ROOT}/{OPENAPI_V3_GROUP_PATH}?hash={digest}"
    return _json({"paths": {OPENAPI_V3_GROUP_PATH: {"serverRelativeURL": url}}})


async def openapi_v3_group(request: web.Request) -> web.StreamResponse:
    body, digest = _group_document()
    headers = {"ETag": f'"{digest}"'}
    if request.query.get("hash") == digest:
        # The hash pins the content: clients may keep it as long as they like.
        headers["Cache-Control"] = "public, immutable"
    return web.Response(body=body, content_type="application/json", headers=headers)


async def openapi_v2(request: web.Request) -> web.StreamResponse:
    """Not served: kubectl 1.32 reads OpenAPI v3 and only falls back to v2 on a 404."""
    return status_response(404, "OpenAPI v2 is not served; use /openapi/v3")
