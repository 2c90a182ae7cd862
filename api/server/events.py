"""GET .../qemuvms/{name}/events and .../projects/{project}/events: the event log, oldest first.

Events are listed by project and name, so a VM's history reads across its re-creations and
after its deletion; an unknown name simply has none. `afterId` pages forwards (poll with the
last id seen), `limit` bounds the answer (the newest `limit` after `afterId`).
"""

from __future__ import annotations

import weakref

import structlog
from aiohttp import web

from api.k8s_types import Event, EventList
from api.server import params
from api.server.backend import project_of
from api.server.keys import DATABASE, SETTINGS
from api.store.events import LIST_LIMIT_MAX, EventLog, EventRecord, EventType, NewEvent
from api.store.sql import FAILURES
from api.tracelinks import trace_url

log = structlog.get_logger(__name__)
LIMIT_DEFAULT = 100
# One EventLog per app: it group-commits the records made through it.
_LOGS: weakref.WeakKeyDictionary[web.Application, EventLog] = weakref.WeakKeyDictionary()


def event_log_of(app: web.Application) -> EventLog:
    """The app's EventLog, made on first use (app state cannot be set once the app runs)."""
    events = _LOGS.get(app)
    if events is None:
        events = _LOGS[app] = EventLog(app[DATABASE])
    return events


async def record_project_event(app: web.Application, project: str, reason: str, message: str) -> None:
    """Record a project-level event (no VM) for an operation already done: a lost event is
    logged, never raised, so the client does not retry what succeeded."""
    try:
        await event_log_of(app).record(NewEvent("", project, "", reason, message))
    except FAILURES as err:
        log.warning("event_record_failed", project=project, reason=reason, error=str(err))


def event_of(record: EventRecord, trace_url_template: str | None = None) -> Event:
    return Event(
        id=record.id,
        time=record.time,
        type="Warning" if record.type is EventType.WARNING else "Normal",
        reason=record.reason,
        message=record.message,
        trace_id=record.trace_id,
        trace_url=trace_url(trace_url_template, record.trace_id),
        uid=record.uid,
        project=record.project,
        vm_name=record.vm_name,
    )


async def vm_events(request: web.Request) -> web.StreamResponse:
    return await _list(request, vm_name=request.match_info["name"])


async def project_events(request: web.Request) -> web.StreamResponse:
    """Every event of the project: its VMs' and its own (force-unlocks), oldest first."""
    return await _list(request, vm_name=None)


async def _list(request: web.Request, *, vm_name: str | None) -> web.StreamResponse:
    project = project_of(request)
    after_id = params.integer(request, "afterId", default=0, minimum=0, maximum=2**63 - 1)
    limit = params.integer(request, "limit", default=LIMIT_DEFAULT, minimum=1, maximum=LIST_LIMIT_MAX)
    records = await event_log_of(request.app).list(
        project=project, vm_name=vm_name, after_id=after_id, limit=limit
    )
    template = request.app[SETTINGS].trace_url_template
    body = EventList(items=tuple(event_of(record, template) for record in records))
    return web.json_response(body.model_dump(mode="json", by_alias=True))
