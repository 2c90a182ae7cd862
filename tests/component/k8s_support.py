"""Shared by the Kubernetes-style API tests: the app on the test's own store (so a test can
write status and finalize as the controller does), and checking answers against /openapi.json."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from api.infra.credentials import load_credentials
from api.server import create_app
from api.server.routes import document
from api.server.streams import install_streams
from api.settings import ServerSettings
from api.store import Database
from api.testing.tfstate import encode
from tests.component.conftest import AUTH, ClientFactory, FakeClock

Client = TestClient[Any, Any]
Serve = Callable[..., Awaitable[Client]]
CREDENTIALS = load_credentials(users="alice:s3cret", tokens="tok-1", users_file=None)
APIS = "/apis/tofu-qemu.dev/v1alpha1"
DOCUMENT = document()
READ_TIMEOUT = 5.0


@pytest.fixture
def serve(aiohttp_client: ClientFactory, db: Database, clock: FakeClock, settings: ServerSettings) -> Serve:
    async def make(**overrides: Any) -> Client:
        app = create_app(
            settings.model_copy(update=overrides), credentials=CREDENTIALS, clock=clock, database=db
        )
        # Until create_app installs it: end open streams at shutdown.
        install_streams(app)
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def api(serve: Serve) -> Client:
    return await serve()


async def post_state(client: Client, project: str, document: dict[str, Any]) -> None:
    response = await client.post(f"/state/{project}", data=encode(document), headers=AUTH)
    assert response.status == 200, await response.text()


def response_schema(
    path: str, method: str, status: int, content_type: str = "application/json"
) -> dict[str, Any]:
    """The documented schema of an answer, with the components its $refs point into."""
    operation = DOCUMENT["paths"][path][method.lower()]
    answer = operation["responses"][str(status)]
    schema = answer["content"][content_type]["schema"]
    return {**schema, "components": DOCUMENT["components"]}


def validate(
    document: Any, path: str, method: str, status: int, content_type: str = "application/json"
) -> None:
    """:raise jsonschema.ValidationError: `document` is not what the OpenAPI document promises."""
    jsonschema.Draft202012Validator(response_schema(path, method, status, content_type)).validate(document)


async def checked_json(response: ClientResponse, path: str, status: int = 200) -> Any:
    """The JSON body of `response`, asserted to have `status` and to match the document."""
    body = await response.json()
    assert response.status == status, body
    validate(body, path, response.method, status)
    return body


class WatchReader:
    """Reads a watch stream one event at a time, with a deadline per event."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response

    async def next(self, within: float = READ_TIMEOUT) -> dict[str, Any]:
        async with asyncio.timeout(within):
            line = await self.response.content.readline()
        assert line, "the stream ended"
        event: dict[str, Any] = json.loads(line)
        return event

    async def next_change(self, within: float = READ_TIMEOUT) -> dict[str, Any]:
        """The next event that is not a BOOKMARK."""
        while True:
            event = await self.next(within)
            if event["type"] != "BOOKMARK":
                return event
