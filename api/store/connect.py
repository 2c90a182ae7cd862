"""Which store a process opens: SQLite in its data dir, or the PostgreSQL server a URL names."""

from __future__ import annotations

from pathlib import Path

from api.store.db import open_database
from api.store.sql import Clock, Database, utc_now
from api.store.urls import check_database_url


async def open_store(data_dir: Path, *, database_url: str | None, clock: Clock = utc_now) -> Database:
    """The migrated store: SQLite in `data_dir` when `database_url` is None, else PostgreSQL.

    :raise ValueError: `database_url` is not a PostgreSQL URL.
    :raise StoreUnavailable: the PostgreSQL server cannot be reached.
    """
    if database_url is None:
        return await open_database(data_dir, clock=clock)
    # Imported here: psycopg and its pool cost a process on SQLite ~10 MB of RSS for nothing.
    from api.store.postgres import open_postgres

    return await open_postgres(check_database_url(database_url), clock=clock)
