"""Authentication middleware: HTTP Basic or bearer token on every route but the public ones
(the probes, and /metrics when `metrics_auth` is off).

Terraform sends Basic credentials pre-emptively on every request
(docs/backend.md#requests-on-the-wire); OpenTofu >= 1.8 can send a bearer token through
`headers`. Both clients report 401 as "requires auth". Lock IDs are never a credential.
"""

from __future__ import annotations

import base64

from aiohttp import web

from api.server.errors import Handler, status_response
from api.server.keys import CREDENTIALS, PUBLIC_PATHS

PROBE_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"
CHALLENGE = {"WWW-Authenticate": 'Basic realm="tofu-qemu", charset="UTF-8"'}
PRINCIPAL = web.RequestKey("principal", str)


def public_paths(*, metrics_auth: bool) -> frozenset[str]:
    """What an app serves without credentials, for app[PUBLIC_PATHS]."""
    return PROBE_PATHS if metrics_auth else PROBE_PATHS | {METRICS_PATH}


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    credentials = request.app[CREDENTIALS]
    if request.path in request.app[PUBLIC_PATHS] or not credentials.enabled:
        return await handler(request)
    principal = _authenticate(request.headers.get("Authorization", ""), request)
    if principal is None:
        return status_response(
            401, "authentication required: valid Basic credentials or a bearer token", headers=CHALLENGE
        )
    request[PRINCIPAL] = principal
    return await handler(request)


def _authenticate(header: str, request: web.Request) -> str | None:
    credentials = request.app[CREDENTIALS]
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value:
        return credentials.check_bearer(value.strip())
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError; so is non-ASCII
            return None
        username, sep, password = decoded.partition(":")
        return credentials.check_basic(username, password) if sep else None
    return None
