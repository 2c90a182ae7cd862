"""The OpenAPI 3.1 document served at /openapi.json. Pure: built from the pydantic models the
handlers answer with (api/types.py, api/k8s_types.py), so schemas cannot drift from responses.

Paths come from the route table (api/server/routes.py): each route carries an `Op` naming its
summary, the model it answers with, its query parameters and its error codes; path
parameters are derived from the path's placeholders. A route without an `Op` (the dashboard's
HTML pages) is not an API and not described. LOCK and UNLOCK are not OpenAPI methods: they are
described on their path and listed in its `x-methods` extension.
OpenAPI 3.1 schemas are JSON Schema 2020-12, which is what pydantic writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.k8s_types import (
    EventList,
    ForceUnlockRequest,
    Lock,
    LockList,
    PurgeStatesRequest,
    PurgeStatesResult,
    QemuVMList,
    Status,
    WatchEvent,
)
from api.types import API_VERSION, QemuVM
from api.usage import UsageReport

OPENAPI_VERSION = "3.1.0"
APIS = "/apis/tofu-qemu.dev/v1alpha1"
REF = "#/components/schemas/{model}"
COMPONENT_MODELS: tuple[type[BaseModel], ...] = (
    QemuVM,
    QemuVMList,
    WatchEvent,
    EventList,
    Lock,
    LockList,
    ForceUnlockRequest,
    PurgeStatesRequest,
    PurgeStatesResult,
    Status,
    UsageReport,
)
WATCH_CONTENT_TYPE = "application/json;stream=watch"
Document = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Op:
    """What one route answers, for the document."""

    summary: str
    # The component schema of the 200 JSON body; None: a JSON object described by `ok`.
    model: str | None = None
    ok: str = ""
    errors: tuple[int, ...] = ()
    query: tuple[dict[str, Any], ...] = ()
    # Replaces the responses built from model/ok/errors (plain text, 204, lock-info bodies).
    responses: Mapping[str, Any] | None = None
    # Operation keys as they are: requestBody, security (probes: []).
    extra: Mapping[str, Any] = field(default_factory=dict)


# A route as the document sees it: (method, path, its Op).
DocumentedRoute = tuple[str, str, Op]


def build_document(routes: Iterable[DocumentedRoute]) -> Document:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "tofu-qemu",
            "version": API_VERSION,
            "description": (
                "A Terraform/OpenTofu http state backend that runs the QEMU VMs the state declares. "
                "See docs/api.md."
            ),
        },
        "security": [{"basicAuth": []}, {"bearerAuth": []}],
        "paths": paths(routes),
        "components": {"schemas": component_schemas(), "securitySchemes": _security_schemes()},
    }


def component_schemas() -> dict[str, Any]:
    _, definitions = models_json_schema(
        [(model, "serialization") for model in COMPONENT_MODELS], ref_template=REF, by_alias=True
    )
    schemas: dict[str, Any] = definitions["$defs"]
    return schemas


def _security_schemes() -> dict[str, Any]:
    return {
        "basicAuth": {"type": "http", "scheme": "basic"},
        "bearerAuth": {"type": "http", "scheme": "bearer"},
    }


# ---- Building blocks ---------------------------------------------------------------------------


def _ref(model: str) -> dict[str, str]:
    return {"$ref": REF.format(model=model)}


def _json(model: str | None, description: str) -> dict[str, Any]:
    schema = _ref(model) if model else {"type": "object"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    meanings = {
        400: "Bad request: a parameter, name or body is invalid",
        401: "Authentication required",
        404: "Not found",
        403: "Forbidden: a request from a page of another origin",
        409: "Conflict",
        410: "Expired: the resourceVersion is older than the kept history; list again",
        413: "The body is larger than max_body_bytes",
        429: (
            "Too many failed authentications from this client or for this user, too many "
            "authentications being checked, or too many open streams; retry after Retry-After seconds"
        ),
        503: "Shutting down, or not ready",
        507: "The data dir is full; nothing was written",
    }
    return {str(code): _json("Status", meanings[code]) for code in (401, 429, *codes)}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": description,
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


PATH_PARAMETERS = {
    "project": _path_param(
        "project", "Project (namespace): letters, digits, '-', '_', '.'; at most 128 characters"
    ),
    "name": _path_param("name", "The object's name (metadata.name)"),
    "serial": _path_param("serial", "A state serial"),
    "host": _path_param("host", "A host's name (--host-name of its controller)"),
}
BOOLEAN = {"type": "string", "enum": ["true", "false", "1", "0"]}
LIST_QUERY = [
    _query(
        "labelSelector",
        {"type": "string", "maxLength": 4096},
        "Kubernetes label selector: a=b, a==b, a!=b, a in (x,y), a notin (x), a, !a; comma = AND",
    ),
    _query(
        "watch", BOOLEAN, "Stream watch events (newline-delimited JSON WatchEvent objects) instead of a list"
    ),
    _query(
        "resourceVersion",
        {"type": "integer", "minimum": 0},
        "Watch: resume after this resourceVersion (0 or absent: ADDED for every object first)",
    ),
    _query(
        "timeoutSeconds",
        {"type": "integer", "minimum": 1, "maximum": 3600},
        "Watch: end the stream after this long (default 1800)",
    ),
    _query(
        "allowWatchBookmarks", BOOLEAN, "Watch: send BOOKMARK events (Kubernetes semantics: only when asked)"
    ),
    _query(
        "resourceVersionMatch",
        {"type": "string", "enum": ["Exact", "NotOlderThan"]},
        "List, with resourceVersion: Exact is served only at the current version (410 otherwise)",
    ),
]


# The methods OpenAPI has; others (LOCK, UNLOCK) go to the path's x-methods.
OPENAPI_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def paths(routes: Iterable[DocumentedRoute]) -> dict[str, Any]:
    """One path item per route path; path parameters from its placeholders."""
    items: dict[str, Any] = {}
    for method, path, op in routes:
        item = items.setdefault(path, {})
        if method.lower() in OPENAPI_METHODS:
            item[method.lower()] = operation(path, op)
        else:
            item.setdefault("x-methods", []).append(method)
            item["description"] = " ".join(
                filter(None, (item.get("description"), f"{method}: {op.summary}."))
            )
    return items


def operation(path: str, op: Op) -> dict[str, Any]:
    responses = op.responses
    if responses is None:
        responses = {"200": _json(op.model, op.ok or op.summary), **_errors(*op.errors)}
    parameters = [PATH_PARAMETERS[name] for name in _PLACEHOLDER.findall(path)] + list(op.query)
    extra = {"parameters": parameters} if parameters else {}
    return {"summary": op.summary, "responses": dict(responses), **extra, **op.extra}


# ---- Operations the route table uses ------------------------------------------------------------

_PLAIN = {"description": "Probe answer", "content": {"application/json": {"schema": {"type": "object"}}}}
_TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}
_JSON_BODY = {"content": {"application/json": {"schema": {"type": "object"}}}}
HEALTHZ = Op("Liveness probe (no auth)", responses={"200": _PLAIN}, extra={"security": []})
READYZ = Op(
    "Readiness probe (no auth)",
    responses={"200": _PLAIN, "503": _json("Status", "Not ready")},
    extra={"security": []},
)
METRICS = Op(
    "Prometheus metrics (auth unless metrics_auth = false)",
    responses={"200": {"description": "Prometheus text", **_TEXT}},
)
OPENAPI = Op("This document", ok="The OpenAPI document")
LOCK_ID = _query("ID", {"type": "string"}, "The lock ID Terraform appends to writes made under its lock")
STATE_READ = Op(
    "Read the state (Terraform http backend, docs/backend.md#answers)",
    responses={
        "200": _json(None, "The state, byte for byte"),
        "204": {"description": "No state yet"},
        **_errors(400),
    },
)
STATE_WRITE = Op(
    "Write the state (Terraform's update_method, POST or PUT)",
    query=(LOCK_ID,),
    responses={
        "200": _json(None, "{version, serial, published}"),
        **_errors(400, 409, 413, 507),
        "423": _json(None, "Locked: the holder's lock info, verbatim"),
    },
    extra={"requestBody": {**_JSON_BODY, "required": True}},
)
STATE_DELETE = Op(
    "Forget the state (admin): its VMs are deleted, and every kept version and the lock with it",
    query=(LOCK_ID,),
    responses={
        "200": _json(None, "{deleted, vmsMarkedForDeletion}"),
        **_errors(400, 404, 409, 507),
        "423": _json(None, "Locked: the holder's lock info"),
    },
)
LOCK = Op("acquire (body = lock info; 200 echoes it; 423 with the holder's info when another ID holds it)")
UNLOCK = Op(
    "release (empty body = force, or the holder's ID; 200; 409 with the holder's info for another ID)"
)
LOCK_POST = Op(
    "Acquire the lock (as LOCK)",
    responses={
        "200": _json(None, "The lock info"),
        **_errors(400, 507),
        "423": _json(None, "The holder's lock info"),
    },
    extra={"requestBody": {**_JSON_BODY, "required": True}},
)
LOCK_DELETE = Op(
    "Release the lock (as UNLOCK; an empty body forces it)",
    responses={
        "200": {"description": "Released, or was not locked"},
        **_errors(400, 507),
        "409": _json(None, "Another ID holds the lock: its lock info"),
    },
    extra={"requestBody": _JSON_BODY},
)


def read(summary: str, model: str | None = None) -> Op:
    """A GET of the read API (/api/v1)."""
    return Op(summary, model=model, errors=(400, 404))


PROJECT_QUERY = _query("project", {"type": "string"}, "Only this project's QemuVMs")
FIELD_SELECTOR = _query(
    "fieldSelector",
    {"type": "string", "maxLength": 4096},
    "metadata.name=..., metadata.namespace=... (= == !=)",
)


def qemuvm_list(summary: str, *, scoped: bool) -> Op:
    ok = _json("QemuVMList", "The list, with the store's resourceVersion at read time")
    ok["content"][WATCH_CONTENT_TYPE] = {"schema": _ref("WatchEvent")}
    query = (*LIST_QUERY, FIELD_SELECTOR) if scoped else (*LIST_QUERY, FIELD_SELECTOR, PROJECT_QUERY)
    return Op(summary, query=query, responses={"200": ok, **_errors(400, 410, 429, 503)})


QEMUVM_GET = Op("One QemuVM (a live one, else the newest being deleted)", model="QemuVM", errors=(400, 404))


def action(verb: str, effect: str) -> Op:
    return Op(
        f"Request {'an' if verb[0] in 'aeiou' else 'a'} {verb}: {effect}",
        model="QemuVM",
        ok="The object, with status.override updated",
        errors=(400, 404, 507),
    )


CONSOLE = Op(
    "The serial console log (text, UTF-8 with invalid bytes replaced)",
    query=(
        _query(
            "tailBytes",
            {"type": "integer", "minimum": 0, "maximum": 1048576},
            "Start this many bytes before the end (default 65536)",
        ),
        _query("follow", BOOLEAN, "Keep streaming what is appended"),
        _query(
            "timeoutSeconds",
            {"type": "integer", "minimum": 1, "maximum": 86400},
            "Follow: end after this long (default: the server's follow_timeout_seconds, 3600)",
        ),
        _query("interactive", BOOLEAN, "A WebSocket attached to the serial port instead (docs/console.md)"),
        _query("readOnly", BOOLEAN, "Interactive: attach as a reader even when nobody writes"),
    ),
    responses={
        "101": {"description": "Interactive: switching to the WebSocket"},
        "200": {"description": "The log's tail, then (follow) what is appended", **_TEXT},
        **_errors(400, 403, 404, 409, 429, 503),
    },
)
_EVENTS_QUERY = (
    _query("afterId", {"type": "integer", "minimum": 0}, "Only events with a larger id (polling)"),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "At most this many (default 100)"),
)
VM_EVENTS = Op(
    "The VM's events (by project and name, across re-creations), oldest first",
    model="EventList",
    errors=(400,),
    query=_EVENTS_QUERY,
)
PROJECT_EVENTS = Op(
    "Every event of the project, its own (ForceUnlocked) included, oldest first",
    model="EventList",
    errors=(400,),
    query=_EVENTS_QUERY,
)
LOCKS = Op("Held state locks of every project", model="LockList")
_TIME = {"type": "string", "format": "date-time", "maxLength": 40}
USAGE = Op(
    "What the project's VMs used (docs/usage.md): totals per VM and project, and hourly points",
    model="UsageReport",
    errors=(400,),
    query=(
        _query("from", _TIME, "RFC 3339; the hours that end after it (default: a day before to)"),
        _query("to", _TIME, "RFC 3339; the hours that start before it (default: now); <= 400 days on"),
        _query("vm", {"type": "string", "maxLength": 63}, "Only the VMs of this name (each uid it had)"),
        _query("points", BOOLEAN, "Include the hourly points (default true); false: totals only"),
    ),
)
FORCE_UNLOCK = Op(
    "Release the project's state lock, as terraform force-unlock does",
    model="Lock",
    ok="The released lock",
    errors=(400, 404, 409, 507),
    extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": _ref("ForceUnlockRequest")}},
        }
    },
)

PURGE_STATES = Op(
    "Remove the project's old state versions (they hold the state's secrets); the current "
    "and the published one always stay",
    model="PurgeStatesResult",
    ok="What was removed and kept",
    errors=(400, 404, 507),
    extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": _ref("PurgeStatesRequest")}},
        }
    },
)


# ---- The Kubernetes routes (docs/kubectl.md) ---------------------------------------------------

TABLE_NOTE = " With Accept: application/json;as=Table;v=v1;g=meta.k8s.io, a meta.k8s.io/v1 Table."


def kubernetes(summary: str, *, errors: tuple[int, ...] = (), query: tuple[dict[str, Any], ...] = ()) -> Op:
    """A Kubernetes document (discovery, core/v1): a JSON object whose `kind` names it."""
    return Op(summary, errors=errors, query=query)


WRITE_REFUSED = Op(
    "Refused with 405: QemuVM specs come from Terraform state (kubectl create, apply, edit, patch, delete)",
    responses={"405": _json("Status", "QemuVM specs come from Terraform state; change them with tofu apply")},
)
EVENTS_CORE = kubernetes(
    "The project's event log as core/v1 Events (kubectl describe, kubectl get events)." + TABLE_NOTE,
    errors=(400,),
    query=(
        _query("fieldSelector", {"type": "string", "maxLength": 4096},
               "involvedObject.name, .uid, .namespace, .kind, reason, type, ... (= == !=)"),
        _query("limit", {"type": "integer", "minimum": 1}, "At most this many (default 500)"),
    ),
)  # fmt: skip
OPENAPI_V2 = Op("Not served (404): use /openapi/v3", responses={"404": _json("Status", "Not served")})
