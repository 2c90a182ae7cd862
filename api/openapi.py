"""The OpenAPI 3.1 document served at /openapi.json. Pure: built from the pydantic models the
handlers answer with (api/types.py, api/k8s_types.py), so schemas cannot drift from responses.

Paths are listed here by hand, one entry per route of api/server/routes.py;
tests/unit/test_openapi.py fails when a route is missing. LOCK and UNLOCK are not OpenAPI
methods: they are described on their path and listed in its `x-methods` extension.
OpenAPI 3.1 schemas are JSON Schema 2020-12, which is what pydantic writes.
"""

from __future__ import annotations

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
)
WATCH_CONTENT_TYPE = "application/json;stream=watch"
Document = dict[str, Any]


def build_document() -> Document:
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
        "paths": _paths(),
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


PROJECT = _path_param("project", "Project: letters, digits, '-', '_', '.'; at most 128 characters")
NAME = _path_param("name", "The QemuVM's name (metadata.name)")
SERIAL = _path_param("serial", "A state serial")
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
    _query("allowWatchBookmarks", BOOLEAN, "Accepted; BOOKMARK events are always sent"),
]


def _operation(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


def _qemuvm_list_get(summary: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    ok = _json("QemuVMList", "The list, with the store's resourceVersion at read time")
    ok["content"][WATCH_CONTENT_TYPE] = {"schema": _ref("WatchEvent")}
    return _operation(summary, {"200": ok, **_errors(400, 410, 429, 503)}, parameters=parameters)


def _action(verb: str, effect: str) -> dict[str, Any]:
    return {
        "post": _operation(
            f"Request a {verb}: {effect}",
            {"200": _json("QemuVM", "The object, with status.override updated"), **_errors(400, 404, 507)},
            parameters=[PROJECT, NAME],
        )
    }


# ---- Paths -------------------------------------------------------------------------------------


def _paths() -> dict[str, Any]:
    return {**_ops_paths(), **_backend_paths(), **_read_api_paths(), **_k8s_paths()}


def _ops_paths() -> dict[str, Any]:
    plain = {"description": "Probe answer", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "/healthz": {"get": _operation("Liveness probe (no auth)", {"200": plain}, security=[])},
        "/readyz": {
            "get": _operation(
                "Readiness probe (no auth)", {"200": plain, "503": _json("Status", "Not ready")}, security=[]
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics (auth unless metrics_auth = false)",
                {
                    "200": {
                        "description": "Prometheus text",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            )
        },
        "/openapi.json": {
            "get": _operation("This document", {"200": _json(None, "The OpenAPI document"), **_errors()})
        },
    }


def _backend_paths() -> dict[str, Any]:
    state_body = {"content": {"application/json": {"schema": {"type": "object"}}}, "required": True}
    lock_id = _query("ID", {"type": "string"}, "The lock ID Terraform appends to writes made under its lock")
    write = _operation(
        "Write the state (Terraform's update_method, POST or PUT)",
        {
            "200": _json(None, "{version, serial, published}"),
            **_errors(400, 409, 413, 507),
            "423": _json(None, "Locked: the holder's lock info, verbatim"),
        },
        parameters=[PROJECT, lock_id],
        requestBody=state_body,
    )
    lock_info = {"content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "/state/{project}": {
            "get": _operation(
                "Read the state (Terraform http backend, docs/backend.md#answers)",
                {
                    "200": _json(None, "The state, byte for byte"),
                    "204": {"description": "No state yet"},
                    **_errors(400),
                },
                parameters=[PROJECT],
            ),
            "post": write,
            "put": write,
            "delete": _operation(
                "Forget the state (admin): its VMs are deleted, and every kept version and the lock with it",
                {
                    "200": _json(None, "{deleted, vmsMarkedForDeletion}"),
                    **_errors(400, 404, 409, 507),
                    "423": _json(None, "Locked: the holder's lock info"),
                },
                parameters=[PROJECT, lock_id],
            ),
        },
        "/state/{project}/lock": {
            "description": (
                "Terraform's lock_address/unlock_address. The methods are LOCK (acquire: body = lock "
                "info; 200 echoes it; 423 with the holder's info when held by another ID) and UNLOCK "
                "(release: empty body = force, or the holder's ID; 200; 409 with the holder's info for "
                "another ID). POST and DELETE do the same for GitLab-style configurations."
            ),
            "x-methods": ["LOCK", "UNLOCK", "POST", "DELETE"],
            "post": _operation(
                "Acquire the lock (as LOCK)",
                {
                    "200": _json(None, "The lock info"),
                    **_errors(400, 507),
                    "423": _json(None, "The holder's lock info"),
                },
                parameters=[PROJECT],
                requestBody={**lock_info, "required": True},
            ),
            "delete": _operation(
                "Release the lock (as UNLOCK; an empty body forces it)",
                {
                    "200": {"description": "Released, or was not locked"},
                    **_errors(400, 507),
                    "409": _json(None, "Another ID holds the lock: its lock info"),
                },
                parameters=[PROJECT],
                requestBody=lock_info,
            ),
        },
    }


def _read_api_paths() -> dict[str, Any]:
    def get(summary: str, *params: dict[str, Any], ok: str | None = None) -> dict[str, Any]:
        return {
            "get": _operation(
                summary, {"200": _json(ok, summary), **_errors(400, 404)}, parameters=list(params)
            )
        }

    api = "/api/v1"
    return {
        f"{api}/projects": get("Projects: serials, lock holder, spec problems"),
        f"{api}/projects/{{project}}": get("One project", PROJECT),
        f"{api}/projects/{{project}}/states": get("Kept state versions", PROJECT),
        f"{api}/projects/{{project}}/states/{{serial}}": get(
            "A kept state version, verbatim", PROJECT, SERIAL
        ),
        f"{api}/vms": get("QemuVM objects of every project ({apiVersion: v1, kind: List, items})"),
        f"{api}/projects/{{project}}/vms": get("QemuVM objects of a project", PROJECT),
        f"{api}/projects/{{project}}/vms/{{name}}": get("One QemuVM", PROJECT, NAME, ok="QemuVM"),
        f"{api}/disks": get("Disk files held"),
        f"{api}/projects/{{project}}/disks": get("Disk files of a project's VMs", PROJECT),
    }


def _k8s_paths() -> dict[str, Any]:
    vm = f"{APIS}/projects/{{project}}/qemuvms/{{name}}"
    project_query = _query("project", {"type": "string"}, "Only this project's QemuVMs")
    events_query = [
        _query("afterId", {"type": "integer", "minimum": 0}, "Only events with a larger id (polling)"),
        _query(
            "limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "At most this many (default 100)"
        ),
    ]
    return {
        f"{APIS}/qemuvms": {"get": _qemuvm_list_get("List or watch QemuVMs", [*LIST_QUERY, project_query])},
        f"{APIS}/projects/{{project}}/qemuvms": {
            "get": _qemuvm_list_get("List or watch a project's QemuVMs", [PROJECT, *LIST_QUERY])
        },
        vm: {
            "get": _operation(
                "One QemuVM (a live one, else the newest being deleted)",
                {"200": _json("QemuVM", "The object"), **_errors(400, 404)},
                parameters=[PROJECT, NAME],
            )
        },
        f"{vm}/restart": _action(
            "restart",
            "restart the running QEMU gracefully (counted in status.restarts), or start a "
            "crash-looping VM at once; lifts a stop",
        ),
        f"{vm}/stop": _action("stop", "hold the VM stopped, whatever its runStrategy, until start"),
        f"{vm}/start": _action("start", "lift a stop: the spec's runStrategy applies again"),
        f"{vm}/console": {
            "get": _operation(
                "The serial console log (text, UTF-8 with invalid bytes replaced)",
                {
                    "200": {
                        "description": "The log's tail, then (follow) what is appended",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(400, 404, 429, 503),
                },
                parameters=[
                    PROJECT,
                    NAME,
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
                ],
            )
        },
        f"{vm}/events": {
            "get": _operation(
                "The VM's events (by project and name, across re-creations), oldest first",
                {"200": _json("EventList", "Events"), **_errors(400)},
                parameters=[PROJECT, NAME, *events_query],
            )
        },
        f"{APIS}/projects/{{project}}/events": {
            "get": _operation(
                "Every event of the project, its own (ForceUnlocked) included, oldest first",
                {"200": _json("EventList", "Events"), **_errors(400)},
                parameters=[PROJECT, *events_query],
            )
        },
        f"{APIS}/locks": {
            "get": _operation(
                "Held state locks of every project", {"200": _json("LockList", "Locks"), **_errors()}
            )
        },
        f"{APIS}/projects/{{project}}/force-unlock": {
            "post": _operation(
                "Release the project's state lock, as terraform force-unlock does",
                {"200": _json("Lock", "The released lock"), **_errors(400, 404, 409, 507)},
                parameters=[PROJECT],
                requestBody={
                    "required": False,
                    "content": {"application/json": {"schema": _ref("ForceUnlockRequest")}},
                },
            )
        },
        f"{APIS}/projects/{{project}}/purge-states": {
            "post": _operation(
                "Remove the project's old state versions (they hold the state's secrets); the current "
                "and the published one always stay",
                {"200": _json("PurgeStatesResult", "What was removed and kept"), **_errors(400, 404, 507)},
                parameters=[PROJECT],
                requestBody={
                    "required": False,
                    "content": {"application/json": {"schema": _ref("PurgeStatesRequest")}},
                },
            )
        },
    }
