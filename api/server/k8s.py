"""The Kubernetes-style API under /apis/tofu-qemu.dev/v1alpha1 (docs/api.md): QemuVM lists
(and watches), single objects, and the imperative stop/start/restart actions.

Console, events, locks and the watch stream live in their own modules; this one routes the
QemuVM resource. Errors the error middleware does not know (too many streams, shutting down)
are mapped here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from api import kube, vm_columns
from api.k8s_types import ListMeta, QemuVMList
from api.server import params
from api.server.auth import PRINCIPAL
from api.server.backend import project_of
from api.server.errors import BadRequest, Handler, status_response
from api.server.events import event_log_of
from api.server.keys import DATABASE, VMS
from api.server.kube import include_object, wants_table
from api.server.streams import ShuttingDown, TooManyStreams
from api.server.watch import (
    WATCH_TIMEOUT_DEFAULT,
    WATCH_TIMEOUT_MAX,
    WatchRequest,
    expired_status,
    serve_watch,
)
from api.store.events import NewEvent
from api.store.sql import FAILURES
from api.store.vms import RunAction, VMRecord
from api.store.watch import WatchStore

log = structlog.get_logger(__name__)
GROUP_VERSION = "/apis/tofu-qemu.dev/v1alpha1"
ANONYMOUS = "anonymous"
STREAM_RETRY_AFTER_SECONDS = 5
_ACTION_REASONS = {
    RunAction.RESTART: "RestartRequested",
    RunAction.STOP: "StopRequested",
    RunAction.START: "StartRequested",
    RunAction.PAUSE: "PauseRequested",
    RunAction.UNPAUSE: "UnpauseRequested",
    RunAction.ROLLOUT: "RolloutRequested",
}


def stream_errors(handler: Handler) -> Handler:
    """Answer the stream hub's refusals: 429 (with Retry-After) and 503."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except TooManyStreams as err:
            return status_response(429, str(err), headers={"Retry-After": str(STREAM_RETRY_AFTER_SECONDS)})
        except ShuttingDown as err:
            return status_response(503, str(err))

    return wrapped


@stream_errors
async def list_qemuvms(request: web.Request) -> web.StreamResponse:
    """The QemuVMs of every project (or of `{project}` / `?project=`), matching `?labelSelector=`
    and `?fieldSelector=`; with `?watch=true`, a watch stream instead (api/server/watch.py).
    A client that accepts a meta.k8s.io Table (kubectl get) gets one."""
    project = params.project_scope(request)
    selector = params.label_selector(request)
    fields = _field_selector(request)
    since = params.integer(request, "resourceVersion", default=0, minimum=0, maximum=2**63 - 1)
    timeout = params.integer(
        request, "timeoutSeconds", default=WATCH_TIMEOUT_DEFAULT, minimum=1, maximum=WATCH_TIMEOUT_MAX
    )
    bookmarks = params.flag(request, "allowWatchBookmarks")
    table = _table_renderer(request)
    exact = _exact_version_wanted(request)
    if params.flag(request, "watch"):
        if exact is not None:
            raise BadRequest("resourceVersionMatch is forbidden for watch")
        render = (lambda obj: table([obj], obj["metadata"]["resourceVersion"])) if table else None
        watch = WatchRequest(project, selector, since or None, timeout, fields, bookmarks, render)
        return await serve_watch(request, watch)
    # A list is the newest state (Kubernetes' "0" and "NotOlderThan" both allow that); only
    # resourceVersionMatch=Exact asks for one version, which the store serves only if current.
    snapshot = await WatchStore(request.app[DATABASE]).snapshot(project=project)
    if exact and since != snapshot.resource_version:
        message = f"too old resource version: {since} (the store keeps only {snapshot.resource_version})"
        return web.json_response(expired_status(message), status=410)
    records = [
        record
        for record in snapshot.records
        if selector.matches(record.labels)
        and fields.matches({"metadata.name": record.name, "metadata.namespace": record.project})
    ]
    if table:
        return web.json_response(table([_dump(record) for record in records], str(snapshot.resource_version)))
    items = tuple(record.to_object() for record in records)
    body = QemuVMList(metadata=ListMeta(resource_version=str(snapshot.resource_version)), items=items)
    return web.json_response(body.model_dump(mode="json", by_alias=True))


def _exact_version_wanted(request: web.Request) -> bool | None:
    """`resourceVersionMatch`: None when absent, else whether it is Exact (Kubernetes' rules)."""
    match = request.query.get("resourceVersionMatch", "")
    if not match:
        return None
    if match not in ("Exact", "NotOlderThan"):
        raise BadRequest(f"resourceVersionMatch must be Exact or NotOlderThan, not {match[:40]!r}")
    if not request.query.get("resourceVersion"):
        raise BadRequest("resourceVersionMatch is forbidden unless resourceVersion is provided")
    return match == "Exact"


def _field_selector(request: web.Request) -> kube.FieldSelector:
    try:
        return kube.parse_field_selector(request.query.get("fieldSelector", ""), kube.QEMUVM_FIELDS)
    except kube.FieldSelectorError as err:
        raise BadRequest(str(err)) from err


TableRenderer = Callable[[list[dict[str, Any]], str], dict[str, Any]]


def _table_renderer(request: web.Request) -> TableRenderer | None:
    """How to answer a client that wants a Table, or None for one that wants objects."""
    if not wants_table(request):
        return None
    include = include_object(request)
    clock = request.app[DATABASE].clock

    def render(objects: list[dict[str, Any]], resource_version: str) -> dict[str, Any]:
        # Ages as of now: a watch renders its events long after it started.
        columns = kube.vm_table_columns(vm_columns.VM_TABLE_COLUMNS, clock())
        return kube.table(columns, objects, include=include, resource_version=resource_version)

    return render


def _dump(record: VMRecord) -> dict[str, Any]:
    dumped: dict[str, Any] = record.to_object().model_dump(mode="json", by_alias=True)
    return dumped


async def get_qemuvm(request: web.Request) -> web.StreamResponse:
    record = await request.app[VMS].get(project_of(request), request.match_info["name"])
    table = _table_renderer(request)
    if table:
        return web.json_response(table([_dump(record)], str(record.resource_version)))
    return web.json_response(_dump(record))


async def restart(request: web.Request) -> web.StreamResponse:
    return await _act(request, RunAction.RESTART)


async def stop(request: web.Request) -> web.StreamResponse:
    return await _act(request, RunAction.STOP)


async def start(request: web.Request) -> web.StreamResponse:
    return await _act(request, RunAction.START)


async def pause(request: web.Request) -> web.StreamResponse:
    return await _act(request, RunAction.PAUSE)


async def unpause(request: web.Request) -> web.StreamResponse:
    return await _act(request, RunAction.UNPAUSE)


async def rollout(request: web.Request) -> web.StreamResponse:
    return await _act(request, RunAction.ROLLOUT)


async def _act(request: web.Request, action: RunAction) -> web.StreamResponse:
    """Record the request as the VM's status.override (the controller obeys it), record an
    event naming who asked, and answer the updated object. The spec is Terraform's: untouched."""
    project, name = project_of(request), request.match_info["name"]
    principal = request.get(PRINCIPAL) or ANONYMOUS
    db = request.app[DATABASE]
    record = await request.app[VMS].request(project, name, action, by=principal, now=db.clock())
    event = NewEvent(record.uid, project, name, _ACTION_REASONS[action], f"{action} requested by {principal}")
    try:
        await event_log_of(request.app).record(event)
    except FAILURES as err:
        # The request is recorded and will be obeyed; a lost event must not make the client retry.
        log.warning("event_record_failed", project=project, vm=name, reason=event.reason, error=str(err))
    log.info("vm_action_requested", project=project, vm=name, action=str(action), by=principal)
    return web.json_response(record.to_object().model_dump(mode="json", by_alias=True))
