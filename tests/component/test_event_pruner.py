"""`tofu-qemu api` alone keeps the event log within its retention (no controller prunes it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient

from api.settings import ServerSettings
from api.store import open_database
from api.store.events import EventLog, NewEvent
from tests.component.test_controller_failures import wait_until_async


async def test_the_api_server_prunes_events_at_start(
    make_client: Callable[[ServerSettings], Awaitable[TestClient[Any, Any]]], settings: ServerSettings
) -> None:
    settings = settings.model_copy(update={"events_per_vm": 2})
    db = await open_database(settings.data_dir)
    try:
        await EventLog(db).record(*(NewEvent("uid-1", "lab", "web", "Started", f"run {n}") for n in range(5)))
    finally:
        await db.close()

    client = await make_client(settings)
    db = await open_database(settings.data_dir)
    try:
        kept = await wait_until_async(
            lambda: EventLog(db).list(project="lab", vm_name="web"), lambda events: len(events) <= 2
        )
    finally:
        await db.close()
        await client.close()
    assert [event.message for event in kept] == ["run 3", "run 4"]
