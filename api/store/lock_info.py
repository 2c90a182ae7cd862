"""Lock bodies: the JSON lock info of a LOCK (kept verbatim, bounded in size and depth) and the
ID an UNLOCK names (docs/backend.md#locks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.tfstate import StateFormatError, load_json, nesting_exceeds

LOCK_INFO_MAX_BYTES = 64 * 1024
LOCK_INFO_DEPTH_MAX = 8


@dataclass(frozen=True, slots=True)
class LockInfo:
    """A LOCK request body: JSON lock info, kept verbatim for conflict answers."""

    id: str
    raw: bytes
    who: str
    operation: str

    @classmethod
    def parse(cls, body: bytes) -> LockInfo:
        """:raise ValueError: if the body is not a lock info object with a non-empty ID."""
        if len(body) > LOCK_INFO_MAX_BYTES:
            raise ValueError(f"lock info is larger than {LOCK_INFO_MAX_BYTES} bytes")
        document = _load_lock_json(body, what="lock info")
        if not isinstance(document, dict) or not isinstance(document.get("ID"), str) or not document["ID"]:
            raise ValueError("lock info must be a JSON object with a non-empty string 'ID'")
        return cls(
            id=document["ID"],
            raw=body,
            who=str(document.get("Who") or ""),
            operation=str(document.get("Operation") or ""),
        )


def unlock_id(body: bytes) -> str | None:
    """The lock ID an UNLOCK names, or None for a force-unlock (docs/backend.md#force-unlock).

    Terraform and OpenTofu < 1.10 send an empty body; OpenTofu >= 1.10 sends the ID the user
    typed with zero-valued other fields, which can be checked like any other ID.

    :raise ValueError: if a non-empty body is not a JSON object.
    """
    if not body.strip():
        return None
    document = _load_lock_json(body, what="unlock body")
    if not isinstance(document, dict):
        raise ValueError("unlock body must be a JSON object")
    lock_id = document.get("ID")
    return lock_id if isinstance(lock_id, str) and lock_id else None


def _load_lock_json(body: bytes, *, what: str) -> Any:
    """Lock info is one flat object in both clients. A stored lock body is parsed again on every
    later write and served by the API, so its depth is bounded here, and so is what SQLite and
    the logs cannot hold (load_json: unpaired surrogates, huge integers).

    :raise StateFormatError: (a ValueError) saying what is wrong.
    """
    document = load_json(body, what=what)
    if nesting_exceeds(document, LOCK_INFO_DEPTH_MAX):
        raise StateFormatError(f"{what} is nested more than {LOCK_INFO_DEPTH_MAX} levels deep")
    return document


def who_and_operation(lock_info: bytes | None) -> tuple[str | None, str | None]:
    """Who holds a lock and for what, from its stored body (None, None: no lock)."""
    if lock_info is None:
        return None, None
    info = LockInfo.parse(bytes(lock_info))
    return info.who, info.operation
