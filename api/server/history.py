"""Purge a project's kept state versions on demand (`tofu-qemu states purge`).

Every accepted write is kept as a version, secrets included, up to `history_limit`; this removes
them now. The current version and the published one (the controller acts on it) always stay.
"""

from __future__ import annotations

import structlog
from aiohttp import web
from pydantic import ValidationError

from api.k8s_types import PurgeStatesRequest, PurgeStatesResult
from api.server.auth import principal_of
from api.server.backend import project_of, read_body
from api.server.errors import BadRequest
from api.server.events import record_project_event
from api.server.keys import STATES
from api.spec_fields import describe_validation_error

log = structlog.get_logger(__name__)


async def purge_states(request: web.Request) -> web.StreamResponse:
    """Remove old versions; answer how many went and how many are left. 404: unknown project."""
    project = project_of(request)
    wanted = _request(await read_body(request))
    outcome = await request.app[STATES].purge(project, keep=wanted.keep)
    principal = principal_of(request)
    if outcome.removed:
        message = f"{principal} purged {outcome.removed} state version(s); {outcome.kept} kept"
        await record_project_event(request.app, project, "StatesPurged", message)
    log.warning("states_purged", project=project, removed=outcome.removed, kept=outcome.kept, by=principal)
    result = PurgeStatesResult(project=project, removed=outcome.removed, kept=outcome.kept)
    return web.json_response(result.model_dump(mode="json", by_alias=True))


def _request(body: bytes) -> PurgeStatesRequest:
    if not body.strip():
        return PurgeStatesRequest()
    try:
        return PurgeStatesRequest.model_validate_json(body)
    except ValidationError as err:
        raise BadRequest(f"purge-states body: {describe_validation_error(err)}") from err
