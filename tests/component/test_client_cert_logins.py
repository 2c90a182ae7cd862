"""Client certificates as the only logins (`tls_client_cert_users`, no users, no tokens): that is
authentication on, not off. A request without a verified certificate is refused like one with
wrong credentials; the probes still answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from api.infra.credentials import load_credentials
from api.server.app import create_app
from api.settings import ServerSettings
from tests.component.conftest import FakeClock

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


async def test_certificates_alone_still_require_a_login(
    aiohttp_client: ClientFactory, clock: FakeClock, tmp_path: Path
) -> None:
    settings = ServerSettings(data_dir=tmp_path / "server", tls_client_cert_users=True)
    nobody = load_credentials(users=None, tokens=None, users_file=None)
    assert not nobody.enabled
    client = await aiohttp_client(create_app(settings, credentials=nobody, clock=clock))

    refused = await client.get("/api/v1/projects")
    assert refused.status == 401
    assert (await refused.json())["code"] == 401
    assert (await client.get("/readyz")).status == 200
