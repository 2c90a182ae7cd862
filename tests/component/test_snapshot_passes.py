"""The snapshot controller's passes (controller/snapshots.py `run_forever`) on both engines: a
host with no snapshot and no restore reads nothing each second; a commit wakes it at once, and an
unsettled snapshot keeps a pass every PASS_SECONDS."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from api.instancetypes import revision_of
from api.snapshots import SNAPSHOT_KIND
from api.store import Database
from api.store.snapshots import SnapshotStore
from controller import snapshots as snapshot_controller
from controller.snapshots import PASS_SECONDS, SnapshotController

NOW = datetime(2026, 12, 3, tzinfo=UTC)


class NoVMs:
    """The runtime seen by a host that runs no VM."""

    def attached_uids(self) -> list[str]:
        return []

    def attached_record(self, uid: str) -> None:
        return None

    async def qmp(
        self, uid: str, name: str, args: dict[str, object] | None = None, *, within: float
    ) -> object:
        raise AssertionError("no VM runs here")


async def passes_in(
    db: Database,
    seconds: float,
    monkeypatch: pytest.MonkeyPatch,
    during: Callable[[], Awaitable[None]] | None = None,
) -> int:
    counted: list[int] = []
    controller = SnapshotController(db, host="a", runtime=NoVMs(), now=lambda: NOW)
    real = controller.run_once

    async def counting() -> None:
        counted.append(1)
        await real()

    monkeypatch.setattr(controller, "run_once", counting)
    task = asyncio.create_task(controller.run_forever())
    try:
        # The first passes (and on PostgreSQL the change feed's start) are not counted.
        await asyncio.sleep(1.5 * PASS_SECONDS)
        counted.clear()
        if during is not None:
            await during()
        await asyncio.sleep(seconds)
    finally:
        task.cancel()
    return len(counted)


async def test_an_idle_host_reads_nothing_each_second(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    assert PASS_SECONDS == 1.0
    assert await passes_in(db, 2.5 * PASS_SECONDS, monkeypatch) == 0, "no pass once settled"


async def test_a_commit_wakes_it_and_an_unready_snapshot_keeps_passes_going(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SnapshotStore(db)
    spec = {"source": {"name": "absent"}}

    async def request() -> None:
        await store.request(SNAPSHOT_KIND, "lab", "snap", spec, by="ops", now=NOW)

    passes = await passes_in(db, 2.5 * PASS_SECONDS, monkeypatch, during=request)
    assert passes >= 2, "woken by the request, then every second while the snapshot is not ready"
    (record,) = await store.list(SNAPSHOT_KIND)
    assert record.revision == revision_of(spec)
    assert record.status is not None
    assert "not found" in str(record.status.get("error"))
    assert snapshot_controller.ORPHAN_SCAN_SECONDS == 60.0
