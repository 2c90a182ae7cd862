"""Component fixtures: a real SQLite store in tmp_path and the real app over HTTP."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.credentials import load_credentials
from api.server import create_app
from api.settings import ServerSettings
from api.store import Database, StateStore, VMStore, open_database

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


@pytest.fixture
async def db(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Database]:
    database = await open_database(tmp_path / "data", clock=clock)
    yield database
    await database.close()


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
