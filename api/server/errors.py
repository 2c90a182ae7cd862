"""One place that turns domain errors into HTTP answers.

Error bodies are Kubernetes `Status` objects, so every client gets JSON that says what is wrong.
Lock conflicts are the exception: Terraform and OpenTofu parse the holder's lock info from
the body of a 409/423 (docs/backend.md#conflicts-and--lock-timeout), so that body is the stored
lock JSON verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import structlog
from aiohttp import web

from api.server.keys import SETTINGS
from api.store import (
    LineageConflict,
    LockConflict,
    LockMismatch,
    NotFound,
    StateLocked,
    StorageFull,
    StoreUnavailable,
)
from api.store.body_files import BodyDamaged

log = structlog.get_logger(__name__)
STORE_UNAVAILABLE_RETRY_AFTER_SECONDS = 5
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """The request itself is wrong (malformed JSON, bad name, bad MD5). Not retryable."""


def status_body(code: int, message: str) -> dict[str, object]:
    """The Kubernetes `Status` object every error answer carries."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": HTTPStatus(code).phrase.replace(" ", ""),
        "message": message,
    }


def status_response(code: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(status_body(code, message), status=code, headers=headers)


def lock_info_response(code: int, holder_info: bytes) -> web.Response:
    return web.Response(status=code, body=holder_info, content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as err:
        return status_response(400, str(err))
    except NotFound as err:
        return status_response(404, str(err))
    except StateLocked as err:
        log.info("state_write_while_locked", path=request.path)
        return lock_info_response(423, err.holder_info)
    except LockConflict as err:
        log.info("lock_conflict", path=request.path, holder=_holder_id(err.holder_info))
        return lock_info_response(423, err.holder_info)
    except LockMismatch as err:
        log.info("lock_mismatch", path=request.path, holder=_holder_id(err.holder_info))
        return lock_info_response(409, err.holder_info or b"{}")
    except LineageConflict as err:
        return status_response(409, str(err))
    except StorageFull as err:
        log.error("storage_full", path=request.path)
        return status_response(507, str(err))
    except BodyDamaged as err:
        log.error("state_body_damaged", path=request.path, error=str(err))
        return status_response(500, f"{err}; restore the store from a backup (docs/operations.md#restoring)")
    except StoreUnavailable as err:
        # Rolled back (or, lost at COMMIT, whole): the client may retry, as Terraform's does on 5xx.
        log.error("store_unavailable", path=request.path, error=str(err))
        return status_response(
            503,
            "the store's database cannot be reached; retry later (a write is stored whole or not at all)",
            headers={"Retry-After": str(STORE_UNAVAILABLE_RETRY_AFTER_SECONDS)},
        )
    except web.HTTPRequestEntityTooLarge as err:
        limit = request.app[SETTINGS].max_body_bytes
        return status_response(413, f"request body is larger than the limit of {limit} bytes ({err.text})")
    except web.HTTPException as err:
        if err.status >= 400:
            return status_response(err.status, err.text or err.reason, headers=_allowed(err))
        raise


def _allowed(err: web.HTTPException) -> dict[str, str] | None:
    allow = err.headers.get("Allow")
    return {"Allow": allow} if allow else None


def _holder_id(info: bytes | None) -> str | None:
    try:
        return str(json.loads(info or b"{}").get("ID"))
    except (ValueError, AttributeError):
        return None
