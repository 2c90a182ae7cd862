"""Reads never see a write transaction that has not committed."""

from __future__ import annotations

import asyncio

import pytest

from api.store import Database, StateStore
from tests.builders import vm_state
from tests.component.test_store_states import write


async def test_read_during_an_open_write_sees_the_committed_state(db: Database, states: StateStore) -> None:
    """A GET racing a write that later rolls back is served the old state, never the new one."""
    await write(states, vm_state(1, {}))
    entered, release = asyncio.Event(), asyncio.Event()

    async def failing_write() -> None:
        async with db.write() as conn:
            await conn.execute("UPDATE projects SET current_version = NULL WHERE name = 'lab'")
            entered.set()
            await release.wait()
            raise RuntimeError("rolled back")

    task = asyncio.create_task(failing_write())
    await entered.wait()
    stored = await states.read("lab")
    release.set()
    with pytest.raises(RuntimeError):
        await task
    assert stored is not None
    assert stored.serial == 1
