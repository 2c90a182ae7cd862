"""Errors the store raises, typed by what the caller can do about them.

The HTTP layer maps each to one status code in one place (api/server/errors.py).
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error the store raises on purpose."""


class NotFound(StoreError):
    """The object does not exist. Not retryable."""


class LockConflict(StoreError):
    """Someone else holds the lock. Retry later (clients do so with -lock-timeout)."""

    def __init__(self, holder_info: bytes) -> None:
        super().__init__("the state is locked by another client")
        self.holder_info = holder_info


class StateLocked(LockConflict):
    """A write came without a lock ID while someone holds the lock."""


class LockMismatch(StoreError):
    """The caller named a lock ID that is not the holder's: it lost its lock."""

    def __init__(self, holder_info: bytes | None) -> None:
        super().__init__("the lock ID does not match the lock holder")
        self.holder_info = holder_info


class LineageConflict(StoreError):
    """strict_lineage refused a write whose lineage differs or whose serial went backwards."""


class StorageFull(StoreError):
    """The disk is full. Retry once space is freed; nothing was changed."""


class StoreUnavailable(StoreError):
    """The database server cannot be reached (PostgreSQL down or unreachable). Retry later.

    The transaction was rolled back, unless the connection was lost during its COMMIT: then it
    is stored completely or not at all, and a retry is safe (a state write is idempotent)."""


class DatabaseFailure(StoreError):
    """A statement failed in the database server for a reason other than the ones above (a
    PostgreSQL error, wrapped where the driver is used so that no other module names it)."""


class ConstraintViolation(DatabaseFailure):
    """A UNIQUE, PRIMARY KEY or foreign key constraint refused the write; nothing was changed."""
