"""The spec store: the only code that speaks SQL.

Holds Terraform states (with every accepted version), their locks, and the QemuVM objects
extracted from them. Writes run in `BEGIN IMMEDIATE` transactions, so a crash leaves either
the old or the new state, never a mix (SQLite WAL, synchronous=FULL).
"""

from api.store.db import Database, open_database
from api.store.errors import (
    LineageConflict,
    LockConflict,
    LockMismatch,
    NotFound,
    StateLocked,
    StorageFull,
    StoreError,
)
from api.store.states import LockInfo, StateStore
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
    "VMStore",
    "open_database",
]
