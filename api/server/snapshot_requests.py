"""Snapshots and restores asked for through the API, beside the declared ones
(docs/snapshots.md#the-cli): `tofu-qemu snapshot vm NAME SNAP` and `tofu-qemu restore vm NAME
--snapshot SNAP` POST here, `tofu-qemu delete snapshot|restore NAME` DELETEs. The controller
treats them as it treats declared ones; a name declared in state stays Terraform's.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api.openapi import Op
from api.server.auth import PRINCIPAL
from api.server.backend import project_of
from api.server.errors import BadRequest, Handler, status_response
from api.server.keys import DATABASE, VMS
from api.snapshots import RESTORE_KIND, SNAPSHOT_KIND
from api.spec_fields import TYPE_NAME_MAX, check_type_name
from api.store.snapshots import NameTaken, SnapshotStore, TooManyRequested

QEMUVM = "/apis/tofu-qemu.dev/v1alpha1/projects/{project}/qemuvms/{name}"
API = "/api/v1/projects/{project}"
# A restore's default name: "restore-" and the epoch seconds of the request.
_RESTORE_PREFIX = "restore-"


def _name_parameter(request: web.Request, key: str) -> str:
    value = request.query.get(key)
    if value is None:
        raise BadRequest(f"the query parameter {key!r} is required")
    try:
        return check_type_name(value)
    except ValueError as err:
        raise BadRequest(f"{key}: {err}") from None


async def _create(request: web.Request, kind: str, name: str, spec: dict[str, Any]) -> web.StreamResponse:
    project, vm = project_of(request), request.match_info["name"]
    await request.app[VMS].get(project, vm)  # :raise NotFound: no such VM
    store = SnapshotStore(request.app[DATABASE])
    by = str(request.get(PRINCIPAL) or "anonymous")
    try:
        await store.request(kind, project, name, spec, by=by, now=request.app[DATABASE].clock())
    except NameTaken as err:
        return status_response(409, str(err))
    except TooManyRequested as err:
        return status_response(403, str(err))
    created = await store.get(kind, project, name)
    assert created is not None
    return web.json_response(created.to_object())


async def take_snapshot(request: web.Request) -> web.StreamResponse:
    name = _name_parameter(request, "snapshot")
    return await _create(request, SNAPSHOT_KIND, name, {"source": {"name": request.match_info["name"]}})


async def restore(request: web.Request) -> web.StreamResponse:
    snapshot = _name_parameter(request, "snapshot")
    if "restore" in request.query:
        name = _name_parameter(request, "restore")
    else:
        name = f"{_RESTORE_PREFIX}{int(request.app[DATABASE].clock().timestamp())}"
    spec = {"target": {"name": request.match_info["name"]}, "snapshot": snapshot}
    return await _create(request, RESTORE_KIND, name, spec)


def deleter(kind: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        project, name = project_of(request), request.match_info["name"]
        try:
            await SnapshotStore(request.app[DATABASE]).forget_requested(kind, project, name)
        except NameTaken as err:
            return status_response(409, str(err))
        return web.json_response(status_body_ok(kind, name))

    return handle


def status_body_ok(kind: str, name: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Success",
        "details": {"kind": kind, "name": name},
    }


def _name_query(name: str, description: str) -> dict[str, Any]:
    schema = {"type": "string", "maxLength": TYPE_NAME_MAX}
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


RouteSpec = tuple[str, str, Handler, Op]


def route_specs() -> list[RouteSpec]:
    snapshot_query = _name_query("snapshot", "The snapshot's name (required)")
    restore_query = _name_query("restore", "The restore's name (default restore-EPOCHSECONDS)")
    created = "The new QemuVMSnapshot or QemuVMRestore"
    errors = (400, 404, 409)
    take = Op("Take a snapshot of the VM, once", ok=created, errors=errors, query=(snapshot_query,))
    revert = Op(
        "Restore the VM to a snapshot, once", ok=created, errors=errors, query=(snapshot_query, restore_query)
    )
    return [
        ("POST", f"{QEMUVM}/snapshot", take_snapshot, take),
        ("POST", f"{QEMUVM}/restore", restore, revert),
        (
            "DELETE",
            f"{API}/snapshots/{{name}}",
            deleter(SNAPSHOT_KIND),
            Op("Delete a requested snapshot", errors=errors),
        ),
        (
            "DELETE",
            f"{API}/restores/{{name}}",
            deleter(RESTORE_KIND),
            Op("Delete a requested restore", errors=errors),
        ),
    ]
