"""Component fixtures: a real store (SQLite in tmp_path, and PostgreSQL) and the real app over HTTP."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.infra.credentials import load_credentials
from api.server import create_app
from api.settings import ServerSettings
from api.store import Database, StateStore, VMStore, open_store
from api.store.db import DB_FILE_NAME
from api.store.postgres import WRITE_LOCK_KEY
from tests.postgres import PostgresCluster

AUTH = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


class FakeClock:
    """An injectable clock for lock ages and timestamps."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Every test that uses the store runs on both engines: None (SQLite in the data dir), or a
    fresh database of the session's PostgreSQL cluster."""
    if request.param == "sqlite":
        return None
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database()


@pytest.fixture
async def db(tmp_path: Path, clock: FakeClock, database_url: str | None) -> AsyncIterator[Database]:
    database = await open_store(tmp_path / "data", database_url=database_url, clock=clock)
    yield database
    await database.close()


@pytest.fixture
def hold_write_lock(tmp_path: Path, database_url: str | None) -> Iterator[Callable[[], Callable[[], None]]]:
    """Take the store's write lock from another connection, as another process would (SQLite's
    BEGIN IMMEDIATE, PostgreSQL's write advisory lock); call the result to let go of it."""
    opened: list[Callable[[], None]] = []

    def hold() -> Callable[[], None]:
        if database_url is None:
            other = sqlite3.connect(tmp_path / "data" / DB_FILE_NAME, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            opened.append(other.close)
            return other.rollback
        connection = psycopg.connect(database_url, autocommit=True)
        connection.execute(f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")
        opened.append(connection.close)

        def release() -> None:
            connection.execute("ROLLBACK")

        return release

    yield hold
    for close in opened:
        close()


@pytest.fixture
def states(db: Database) -> StateStore:
    return StateStore(db, history_limit=3)


@pytest.fixture
def vms(db: Database) -> VMStore:
    return VMStore(db)


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(data_dir=tmp_path / "server", max_body_bytes=256 * 1024, history_limit=5)


@pytest.fixture
def make_client(
    aiohttp_client: ClientFactory, clock: FakeClock
) -> Callable[[ServerSettings], Awaitable[TestClient[Any, Any]]]:
    async def make(settings: ServerSettings) -> TestClient[Any, Any]:
        credentials = load_credentials(users="alice:s3cret", tokens="tok-1", users_file=None)
        app: web.Application = create_app(settings, credentials=credentials, clock=clock)
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(
    make_client: Callable[[ServerSettings], Awaitable[TestClient[Any, Any]]], settings: ServerSettings
) -> TestClient[Any, Any]:
    return await make_client(settings)
