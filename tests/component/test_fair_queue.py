"""The controller's queue is fair across projects from the store on: the real store watch
learns each new VM's project, and one project's flood does not hold another's VM back."""

from __future__ import annotations

import asyncio

from api.store import Database, StateStore, VMStore
from api.store.status_writer import VMStatusWriter
from api.testing.tfstate import vm_state
from api.testing.waiting import wait_until_async
from controller.clock import LoopClock
from controller.project_index import NO_PROJECT, ProjectIndex
from controller.queue import WorkQueue
from controller.sources import watch_store
from tests.component.test_store_states import write

FLOOD = 2000


async def test_a_late_project_is_handed_out_second_after_a_flood(
    db: Database, states: StateStore, vms: VMStore
) -> None:
    projects = ProjectIndex(db)
    queue: WorkQueue[str] = WorkQueue(clock=LoopClock(), group_of=projects)
    watcher = asyncio.create_task(watch_store(db, VMStatusWriter(db), queue, projects))
    try:
        await write(states, vm_state(1, {f"vm-{n}": dict() for n in range(FLOOD)}), project="a")
        await wait_until_async(lambda: len(queue) >= FLOOD)
        await write(states, vm_state(1, {"late": dict()}), project="b")
        await wait_until_async(lambda: len(queue) >= FLOOD + 1)
    finally:
        watcher.cancel()
    [late] = await vms.list_records(project="b")
    first, second = await queue.get(), await queue.get()
    assert late.uid in (first, second)
    assert projects(late.uid) == "b"
    assert projects(first if second == late.uid else second) == "a"


async def test_the_index_looks_up_once_and_forgets_gone_uids(
    db: Database, states: StateStore, vms: VMStore
) -> None:
    await write(states, vm_state(1, {"one": dict(), "two": dict()}), project="a")
    one, two = sorted(await vms.list_records(project="a"), key=lambda record: record.name)
    projects = ProjectIndex(db)
    await projects.learn([one.uid, two.uid, "orphan-uid"])
    assert (projects(one.uid), projects(two.uid), projects("orphan-uid")) == ("a", "a", NO_PROJECT)
    projects.keep_only([one.uid])
    assert projects(two.uid) == NO_PROJECT
