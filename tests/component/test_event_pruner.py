"""The event log has one pruner per process that holds the store, started by the composition
root whatever the process serves (controller/event_pruner.py); neither the HTTP app nor the
controller prunes on its own."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from api.infra.credentials import Credentials
from api.infra.health import ReadinessCheck
from api.settings import ServerSettings
from api.store import Database, open_database
from api.store.events import EventLog, NewEvent
from api.testing.waiting import wait_until_async
from controller import cli
from controller.settings import ControllerSettings, ServeSettings

LOOPBACK_ANY_PORT = "127.0.0.1:0"


async def record_five_events(data_dir: Path) -> None:
    db = await open_database(data_dir)
    try:
        await EventLog(db).record(*(NewEvent("uid-1", "lab", "web", "Started", f"run {n}") for n in range(5)))
    finally:
        await db.close()


async def test_tofu_qemu_api_prunes_the_event_log_at_start(tmp_path: Path) -> None:
    """`tofu-qemu api` alone (no controller) keeps the log within its retention."""
    settings = ServerSettings(data_dir=tmp_path / "data", listen=LOOPBACK_ANY_PORT, events_per_vm=2)
    await record_five_events(settings.data_dir)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(cli._run(settings, cli._HttpSetup(Credentials(), None), stop))
        db = await open_database(settings.data_dir)
        try:
            kept = await wait_until_async(
                lambda: EventLog(db).list(project="lab", vm_name="web"),
                lambda events: len(events) <= 2,
                what="the events pruned to 2",
            )
        finally:
            await db.close()
            stop.set()
    assert [event.message for event in kept] == ["run 3", "run 4"]


class StandInController:
    """The controller's surface the composition root uses; it records nothing and prunes nothing."""

    def __init__(self, _settings: ControllerSettings, _db: Database, *, metrics: Any) -> None:
        pass

    def readiness_checks(self) -> dict[str, ReadinessCheck]:
        return {}

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()


@pytest.mark.parametrize(
    ("command", "settings_type", "http"),
    [
        ("api", ServerSettings, True),
        ("controller", ControllerSettings, False),
        ("serve", ServeSettings, True),
    ],
)
async def test_every_command_starts_exactly_one_pruner(
    command: str,
    settings_type: type[ServerSettings | ControllerSettings],
    http: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[str] = []

    async def counting_pruner(stop: asyncio.Event, *_args: object) -> None:
        started.append(command)
        await stop.wait()

    monkeypatch.setattr(cli, "prune_events_until", counting_pruner)
    monkeypatch.setattr(cli, "Controller", StandInController)
    fields: dict[str, Any] = {"data_dir": tmp_path / "data"}
    if issubclass(settings_type, ServerSettings):
        fields["listen"] = LOOPBACK_ANY_PORT
    if issubclass(settings_type, ControllerSettings):
        fields["ops_listen"] = LOOPBACK_ANY_PORT
    settings = settings_type(**fields)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(cli._run(settings, cli._HttpSetup(Credentials(), None) if http else None, stop))
        await wait_until_async(lambda: bool(started), what="a pruner started")
        await asyncio.sleep(0.2)  # a second pruner would have started by now
        stop.set()
    assert started == [command]
