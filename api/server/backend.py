"""The Terraform/OpenTofu `http` state backend (docs/backend.md#answers).

GET/POST/PUT/DELETE /state/{project} and LOCK/UNLOCK (or GitLab-style POST/DELETE) on
/state/{project}/lock. Handlers parse and validate at the edge, call the store once, and let
the error middleware answer for every failure.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor

import structlog
from aiohttp import web
from opentelemetry import trace

from api.names import project_name_problem
from api.server.errors import BadRequest
from api.server.keys import METRICS, STATES
from api.state_reader import read_state
from api.store import LockConflict
from api.store.lock_info import LockInfo, unlock_id
from api.tfstate import Extraction, StateFormatError, StateSummary

log = structlog.get_logger(__name__)
TRACER = trace.get_tracer("tofu_qemu.api")
# Parsing a multi-megabyte state takes milliseconds per MiB: keep it off the event loop. The
# parse holds the GIL, so more threads would not parse faster; two let one state's parse
# overlap another's thread hops. Large states are decoded in pieces (api/json_body.py), so the
# loop gets the GIL back between them while a thread parses.
_PARSE_IN_THREAD_BYTES = 256 * 1024
PARSE_THREADS = 2
_PARSER = ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="state-parse")


def project_of(request: web.Request) -> str:
    """The validated `{project}` path segment. :raise BadRequest: if it is not a valid name."""
    project = request.match_info["project"]
    problem = project_name_problem(project)
    if problem:
        raise BadRequest(problem)
    return project


async def read_body(request: web.Request) -> bytes:
    """The request body, checked against Content-MD5 when the client sent one (both clients do).

    For small bodies (lock info): a state's is read by put_state. :raise BadRequest: the MD5 does
    not match. aiohttp raises 413 past the size limit.
    """
    body = await request.read()
    checked_md5(body, request.headers.get("Content-MD5"))
    return body


def checked_md5(body: bytes, expected: str | None) -> str:
    """The body's MD5 as hex, computed once for the Content-MD5 check and the store.

    :raise BadRequest: `expected` (base64, as the header carries it) is not the body's MD5.
    """
    digest = hashlib.md5(body, usedforsecurity=False).digest()
    if expected is not None:
        actual = base64.b64encode(digest).decode()
        if expected.strip() != actual:
            raise BadRequest(f"Content-MD5 {expected.strip()!r} does not match the body (md5 {actual})")
    return digest.hex()


def lock_id_of(request: web.Request) -> str | None:
    """`?ID=` as Terraform appends it to writes made under a lock (docs/backend.md#requests-on-the-wire)."""
    return request.query.get("ID") or None


def traced_project(request: web.Request, operation: str) -> str:
    """The validated project, also named (with the backend operation) on the request's span."""
    project = project_of(request)
    trace.get_current_span().set_attributes({"tofu_qemu.project": project, "tofu_qemu.operation": operation})
    return project


async def get_state(request: web.Request) -> web.StreamResponse:
    stored = await request.app[STATES].read(traced_project(request, "GET"))
    if stored is None:
        # 204 means "no state yet" to Terraform and to every OpenTofu version (docs/backend.md#answers).
        return web.Response(status=204)
    return web.Response(body=stored.body, content_type="application/json")


async def put_state(request: web.Request) -> web.StreamResponse:
    project = traced_project(request, "POST")
    body = await request.read()
    expected_md5 = request.headers.get("Content-MD5")
    with TRACER.start_as_current_span("extract QemuVM specs") as span:
        if len(body) > _PARSE_IN_THREAD_BYTES:
            # One job for the hash and the parse: each hop to a thread and back costs the loop.
            loop = asyncio.get_running_loop()
            md5, summary, extraction = await loop.run_in_executor(_PARSER, _read_state, body, expected_md5)
        else:
            md5, summary, extraction = _read_state(body, expected_md5)
        span.set_attribute("tofu_qemu.vms_declared", len(extraction.vms) if extraction else 0)
        outcome = await request.app[STATES].write(
            project, body, summary, extraction, lock_id=lock_id_of(request), md5=md5
        )
        changes = outcome.published
        span.set_attributes(
            {
                "tofu_qemu.published": changes is not None,
                "tofu_qemu.vms_created": len(changes.created) if changes else 0,
                "tofu_qemu.vms_changed": len(changes.changed) if changes else 0,
                "tofu_qemu.vms_deleted": len(changes.deleted) if changes else 0,
            }
        )
    request.app[METRICS].state_writes_total.labels(project=project).inc()
    log.info(
        "state_written",
        project=project,
        serial=summary.serial,
        version=outcome.version,
        bytes=len(body),
        encrypted=summary.is_encrypted,
        published=changes is not None,
        vms_created=len(changes.created) if changes else 0,
        vms_changed=len(changes.changed) if changes else 0,
        vms_deleted=len(changes.deleted) if changes else 0,
    )
    return web.json_response(
        {"version": outcome.version, "serial": summary.serial, "published": changes is not None}
    )


def _read_state(body: bytes, expected_md5: str | None) -> tuple[str, StateSummary, Extraction | None]:
    """The body's MD5 (checked against `expected_md5`), its summary and its VM specs.

    :raise BadRequest: the MD5 does not match, or the body is no state.
    """
    md5 = checked_md5(body, expected_md5)
    try:
        return md5, *read_state(body)
    except StateFormatError as err:
        raise BadRequest(str(err)) from err


async def delete_state(request: web.Request) -> web.StreamResponse:
    project = traced_project(request, "DELETE")
    changes = await request.app[STATES].delete(project, lock_id=lock_id_of(request))
    log.info("state_deleted", project=project, vms_deleted=len(changes.deleted))
    return web.json_response({"deleted": project, "vmsMarkedForDeletion": len(changes.deleted)})


async def lock_state(request: web.Request) -> web.StreamResponse:
    project = traced_project(request, "LOCK")
    try:
        info = LockInfo.parse(await read_body(request))
    except ValueError as err:
        raise BadRequest(str(err)) from err
    try:
        await request.app[STATES].lock(project, info)
    except LockConflict:
        request.app[METRICS].lock_conflicts_total.labels(project=project).inc()
        raise
    log.info("state_locked", project=project, lock_id=info.id, who=info.who, operation=info.operation)
    # Only 200 counts as "acquired"; 201/204 are errors to the client (docs/backend.md#answers).
    return web.Response(status=200, body=info.raw, content_type="application/json")


async def unlock_state(request: web.Request) -> web.StreamResponse:
    project = traced_project(request, "UNLOCK")
    try:
        lock_id = unlock_id(await read_body(request))
    except ValueError as err:
        raise BadRequest(str(err)) from err
    released = await request.app[STATES].unlock(project, lock_id)
    log.info(
        "state_unlocked",
        project=project,
        lock_id=lock_id,
        forced=lock_id is None,
        was_locked=released is not None,
    )
    return web.Response(status=200)
