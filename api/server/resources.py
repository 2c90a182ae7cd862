"""The read API over projects, state versions and VM objects (/api/v1/...)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api.server.backend import project_of
from api.server.errors import BadRequest
from api.server.keys import DATABASE, STATES, VMS
from api.server.snapshots import snapshot_disk_items
from api.store.allocations import Allocations, DiskRow
from api.store.states import ProjectInfo, VersionInfo


def _project_json(info: ProjectInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "serial": info.serial,
        "lineage": info.lineage,
        "publishedSerial": info.published_serial,
        "pendingSerial": info.pending_serial,
        "lock": {"info": info.lock.info, "lockedAt": info.lock.locked_at.isoformat()} if info.lock else None,
        "specs": {"readable": info.specs_note is None, "message": info.specs_note},
        "problems": [{"address": p.address, "message": p.message} for p in info.problems],
        "vmCount": info.vm_count,
        "versionCount": info.version_count,
    }


def _version_json(version: VersionInfo) -> dict[str, Any]:
    return {
        "version": version.version,
        "serial": version.serial,
        "lineage": version.lineage,
        "md5": version.md5,
        "size": version.size,
        "createdAt": version.created_at.isoformat(),
        "encryptionVersion": version.encryption_version,
        "who": version.lock_who,
        "operation": version.lock_operation,
    }


async def list_projects(request: web.Request) -> web.StreamResponse:
    projects = await request.app[STATES].list_projects()
    return web.json_response({"items": [_project_json(p) for p in projects]})


async def get_project(request: web.Request) -> web.StreamResponse:
    return web.json_response(_project_json(await request.app[STATES].project(project_of(request))))


async def list_versions(request: web.Request) -> web.StreamResponse:
    versions = await request.app[STATES].list_versions(project_of(request))
    return web.json_response({"items": [_version_json(v) for v in versions]})


async def get_version(request: web.Request) -> web.StreamResponse:
    serial_text = request.match_info["serial"]
    # isascii: "²" is a digit to str.isdigit() and an error to int().
    if not (serial_text.isascii() and serial_text.isdigit()) or len(serial_text) > 18:
        raise BadRequest(f"serial {serial_text[:40]!r} must be a non-negative integer")
    stored = await request.app[STATES].read_version(project_of(request), int(serial_text))
    return web.Response(body=stored.body, content_type="application/json")


async def list_vms(request: web.Request) -> web.StreamResponse:
    project = project_of(request) if "project" in request.match_info else None
    records = await request.app[VMS].list_records(project=project)
    items = [record.to_object().model_dump(mode="json", by_alias=True) for record in records]
    return web.json_response({"apiVersion": "v1", "kind": "List", "items": items})


async def get_vm(request: web.Request) -> web.StreamResponse:
    record = await request.app[VMS].get(project_of(request), request.match_info["name"])
    return web.json_response(record.to_object().model_dump(mode="json", by_alias=True))


def _disk_json(row: DiskRow, *, retained: bool) -> dict[str, Any]:
    return {
        "name": row.name,
        "project": row.owner.project if row.owner else None,
        "vm": row.owner.vm_name if row.owner else None,
        "uid": row.uid,
        "sizeMiB": row.size_mib,
        "reclaimPolicy": row.reclaim_policy.value,
        "base": row.base,
        # Its VM is gone and `reclaimPolicy: Retain` kept it for a VM of the same name.
        "retained": retained,
    }


async def list_disks(request: web.Request) -> web.StreamResponse:
    """Disk files the controller holds, including retained ones whose VM is gone."""
    project = project_of(request) if "project" in request.match_info else None
    allocations = Allocations(request.app[DATABASE], every_host=True)
    retained = {(row.uid, row.name) for row in await allocations.retained_disks()}
    items = [
        _disk_json(row, retained=(row.uid, row.name) in retained)
        for row in await allocations.disks()
        if project is None or (row.owner is not None and row.owner.project == project)
    ]
    # snapshots: their data counts as disk space (docs/snapshots.md#accounting).
    items += await snapshot_disk_items(request, project)
    return web.json_response({"items": items})
