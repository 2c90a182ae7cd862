"""Held Terraform state locks: list them across projects, and force-unlock one.

Force-unlock does what `terraform force-unlock` does (docs/backend.md#force-unlock): an UNLOCK without an
ID releases whatever lock is held, and publishes the state written under it. With `{"id": ...}`
it releases only that lock (the check OpenTofu >= 1.10 makes), so a lock taken by someone else
after you looked is never released by mistake.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from api.k8s_types import ForceUnlockRequest, Lock, LockList
from api.server.auth import principal_of
from api.server.backend import project_of, read_body
from api.server.errors import BadRequest, status_response
from api.server.events import record_project_event
from api.server.keys import DATABASE, STATES
from api.spec_fields import describe_validation_error
from api.store import LockMismatch
from api.store.states import HeldLock

log = structlog.get_logger(__name__)


def lock_of(project: str, held: HeldLock, *, now: datetime) -> Lock:
    info = held.info if isinstance(held.info, dict) else {}
    return Lock(
        project=project,
        id=str(info.get("ID") or ""),
        who=str(info.get("Who") or ""),
        operation=str(info.get("Operation") or ""),
        created=str(info.get("Created") or ""),
        locked_at=held.locked_at,
        age_seconds=max(0.0, (now - held.locked_at).total_seconds()),
        info=info,
    )


def lock_json(lock: Lock) -> dict[str, Any]:
    rendered: dict[str, Any] = lock.model_dump(mode="json", by_alias=True)
    return rendered


async def list_locks(request: web.Request) -> web.StreamResponse:
    now = request.app[DATABASE].clock()
    projects = await request.app[STATES].list_projects()
    items = tuple(lock_of(p.name, p.lock, now=now) for p in projects if p.lock is not None)
    return web.json_response(LockList(items=items).model_dump(mode="json", by_alias=True))


async def force_unlock(request: web.Request) -> web.StreamResponse:
    """Release the project's lock; answer the released lock.

    404: no such project. 409: nothing is locked, or `id` names a lock that is not held.
    """
    project = project_of(request)
    wanted = _requested_id(await read_body(request))
    states = request.app[STATES]
    held = (await states.project(project)).lock
    if held is None:
        return status_response(409, f"project {project!r} is not locked")
    try:
        released = await states.unlock(project, wanted)
    except LockMismatch as err:
        holder = _info(err.holder_info)
        return status_response(
            409,
            f"project {project!r} is locked by ID {holder.get('ID')!r}, not {wanted!r}; nothing was unlocked",
        )
    if released is None:  # released by someone else since we looked
        return status_response(409, f"project {project!r} is not locked")
    info = _info(released)
    principal = principal_of(request)
    message = (
        f"{principal} force-unlocked the state: ID={info.get('ID')!s}, Who={info.get('Who')!s},"
        f" Operation={info.get('Operation')!s}, Created={info.get('Created')!s}"
    )
    await record_project_event(request.app, project, "ForceUnlocked", message)
    log.warning("state_force_unlocked", project=project, lock_id=info.get("ID"), by=principal)
    lock = lock_of(project, HeldLock(info, held.locked_at), now=request.app[DATABASE].clock())
    return web.json_response(lock_json(lock))


def _requested_id(body: bytes) -> str | None:
    """The lock ID the body names; None for an empty body (release whatever is held)."""
    if not body.strip():
        return None
    try:
        return ForceUnlockRequest.model_validate_json(body).id
    except ValidationError as err:
        raise BadRequest(f"force-unlock body: {describe_validation_error(err)}") from err


def _info(raw: bytes | None) -> dict[str, Any]:
    try:
        document = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}
