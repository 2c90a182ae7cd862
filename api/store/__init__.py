"""The spec store: the only code that speaks SQL.

Holds Terraform states (with every accepted version), their locks, and the QemuVM objects
extracted from them. Writes run in serialised transactions, so a crash leaves either the old or
the new state, never a mix: SQLite (WAL, synchronous=FULL, BEGIN IMMEDIATE) by default, or
PostgreSQL with `--database-url` (api/store/sql.py is the seam between the two).
"""

from api.store.connect import open_store
from api.store.db import Database, open_database
from api.store.errors import (
    LineageConflict,
    LockConflict,
    LockMismatch,
    NotFound,
    StateLocked,
    StorageFull,
    StoreError,
    StoreUnavailable,
)
from api.store.lock_info import LockInfo
from api.store.states import StateStore
from api.store.vms import VMStore

__all__ = [
    "Database",
    "LineageConflict",
    "LockConflict",
    "LockInfo",
    "LockMismatch",
    "NotFound",
    "StateLocked",
    "StateStore",
    "StorageFull",
    "StoreError",
    "StoreUnavailable",
    "VMStore",
    "open_database",
    "open_store",
]
