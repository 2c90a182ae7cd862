"""The work queue keeps client-go's guarantees: dedup, one worker per key, backoff, drain."""

from __future__ import annotations

import asyncio

import pytest

from controller.clock import ManualClock
from controller.queue import Backoff, QueueShutDown, WorkQueue


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def queue(clock: ManualClock) -> WorkQueue[str]:
    return WorkQueue(clock=clock, backoff=Backoff(base=1.0, cap=8.0))


async def drain(queue: WorkQueue[str]) -> list[str]:
    """Every key currently queued, each marked done."""
    keys = []
    while len(queue):
        key = await queue.get()
        queue.done(key)
        keys.append(key)
    return keys


async def test_repeated_adds_collapse(queue: WorkQueue[str]) -> None:
    """Adding a waiting key again does not queue it twice."""
    for key in ("a", "b", "a", "a"):
        queue.add(key)
    assert await drain(queue) == ["a", "b"]


async def test_key_added_while_processing_runs_again_after_done(queue: WorkQueue[str]) -> None:
    """A change during processing is not lost, and the key never runs twice at once."""
    queue.add("a")
    key = await queue.get()
    queue.add("a")
    assert len(queue) == 0
    queue.done(key)
    assert await drain(queue) == ["a"]


async def test_add_after_waits_for_the_clock(queue: WorkQueue[str], clock: ManualClock) -> None:
    """A delayed key appears only when its time comes."""
    queue.add_after("a", 5)
    clock.advance(4.9)
    assert len(queue) == 0
    clock.advance(0.1)
    assert await drain(queue) == ["a"]


async def test_earliest_delay_wins(queue: WorkQueue[str], clock: ManualClock) -> None:
    """Of two delayed adds of one key the earlier time is kept, and the key comes once."""
    queue.add_after("a", 10)
    queue.add_after("a", 2)
    queue.add_after("a", 5)
    clock.advance(2)
    assert await drain(queue) == ["a"]
    clock.advance(10)
    assert len(queue) == 0


async def test_backoff_grows_exponentially_to_the_cap(queue: WorkQueue[str]) -> None:
    """Each failure doubles the delay up to the cap; forget resets it."""
    delays = [queue.add_rate_limited("a") for _ in range(6)]
    assert delays == [1, 2, 4, 8, 8, 8]
    queue.forget("a")
    assert queue.add_rate_limited("a") == 1


async def test_backoff_is_per_key(queue: WorkQueue[str]) -> None:
    """One failing key does not slow another."""
    for _ in range(3):
        queue.add_rate_limited("bad")
    assert queue.add_rate_limited("good") == 1


async def test_immediate_add_replaces_a_pending_delay(queue: WorkQueue[str], clock: ManualClock) -> None:
    """An event for a key in backoff reconciles it now (level-triggered), once."""
    queue.add_rate_limited("a")
    queue.add("a")
    assert await drain(queue) == ["a"]
    clock.advance(60)
    assert len(queue) == 0


async def test_get_waits_for_work(queue: WorkQueue[str]) -> None:
    """A waiting worker wakes when a key is added."""
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    queue.add("a")
    assert await asyncio.wait_for(getter, 1) == "a"


async def test_workers_never_share_a_key(queue: WorkQueue[str]) -> None:
    """With many workers and repeated adds, a key is processed by one worker at a time."""
    active: set[str] = set()
    overlaps: list[str] = []
    processed: list[str] = []

    async def worker() -> None:
        while True:
            try:
                key = await queue.get()
            except QueueShutDown:
                return
            if key in active:
                overlaps.append(key)
            active.add(key)
            await asyncio.sleep(0)
            processed.append(key)
            active.discard(key)
            queue.done(key)

    async with asyncio.TaskGroup() as group:
        for _ in range(4):
            group.create_task(worker())
        for round_ in range(20):
            for key in ("a", "b", "c"):
                queue.add(key)
            if round_ % 3 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        queue.shut_down()
    assert overlaps == []
    assert set(processed) == {"a", "b", "c"}


async def test_shutdown_drains_then_stops(queue: WorkQueue[str], clock: ManualClock) -> None:
    """After shut_down queued keys are still handed out, delayed ones are dropped, then get raises."""
    queue.add("a")
    queue.add_after("b", 1)
    queue.shut_down()
    queue.add("c")
    assert await queue.get() == "a"
    clock.advance(2)
    with pytest.raises(QueueShutDown):
        await queue.get()


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []

    def added(self, depth: int) -> None:
        self.events.append(("added", depth))

    def retried(self) -> None:
        self.events.append(("retried", 0))

    def started(self, waited_seconds: float, depth: int) -> None:
        self.events.append(("started", waited_seconds))

    def finished(self, worked_seconds: float) -> None:
        self.events.append(("finished", worked_seconds))


async def test_observer_sees_adds_waits_work_and_retries(clock: ManualClock) -> None:
    """The figures workqueue_* metrics are made of: depth, time queued, time worked, retries."""
    observer = RecordingObserver()
    queue: WorkQueue[str] = WorkQueue(clock=clock, backoff=Backoff(base=1.0, cap=8.0), observer=observer)
    queue.add("a")
    queue.add("b")
    queue.add("a")  # deduplicated: not an add
    clock.advance(2.0)
    key = await queue.get()
    clock.advance(0.5)
    queue.done(key)
    queue.add_rate_limited("c")

    assert observer.events == [
        ("added", 1),
        ("added", 2),
        ("started", 2.0),
        ("finished", 0.5),
        ("retried", 0),
    ]


def project_queue(clock: ManualClock) -> WorkQueue[str]:
    """Keys look like "PROJECT/NAME"; the project is their fairness group."""
    return WorkQueue(clock=clock, group_of=lambda key: key.partition("/")[0])


async def test_projects_take_turns(clock: ManualClock) -> None:
    """Round-robin across projects, FIFO within one: a's flood does not hold b and c back."""
    queue = project_queue(clock)
    for key in ("a/1", "a/2", "a/3", "a/4", "b/1", "c/1", "b/2"):
        queue.add(key)
    assert await drain(queue) == ["a/1", "b/1", "c/1", "a/2", "b/2", "a/3", "a/4"]


async def test_a_project_that_empties_joins_the_rotation_at_the_end(clock: ManualClock) -> None:
    """A group leaves the rotation when it has nothing queued, and rejoins behind the others."""
    queue = project_queue(clock)
    for key in ("a/1", "a/2", "b/1"):
        queue.add(key)
    assert await queue.get() == "a/1"
    assert await queue.get() == "b/1"
    queue.add("b/2")
    queue.add("c/1")
    assert await drain(queue) == ["a/2", "b/2", "c/1"]


async def test_one_key_of_another_project_waits_for_one_key_of_a_flood(clock: ManualClock) -> None:
    """10,000 keys of project a, then one of b: b is the second key handed out (a FIFO: 10,001st)."""
    queue = project_queue(clock)
    for index in range(10_000):
        queue.add(f"a/{index}")
    queue.add("b/late")
    order = await drain(queue)
    assert order.index("b/late") == 1
    assert len(order) == 10_001


async def test_fairness_keeps_dedup_and_one_worker_per_key(clock: ManualClock) -> None:
    """Grouping changes the order only: a waiting key is queued once, a busy key runs again later."""
    queue = project_queue(clock)
    for key in ("a/1", "b/1", "a/1", "b/1"):
        queue.add(key)
    assert len(queue) == 2
    key = await queue.get()
    queue.add(key)
    assert len(queue) == 1
    queue.done(key)
    assert sorted(await drain(queue)) == ["a/1", "b/1"]


async def test_depth_counts_every_group(clock: ManualClock) -> None:
    """workqueue_depth is the sum over projects, as added and as taken."""
    observer = RecordingObserver()
    queue: WorkQueue[str] = WorkQueue(
        clock=clock, observer=observer, group_of=lambda key: key.partition("/")[0]
    )
    for key in ("a/1", "b/1", "a/2"):
        queue.add(key)
    assert [depth for event, depth in observer.events if event == "added"] == [1, 2, 3]
    assert len(queue) == 3
    await queue.get()
    assert len(queue) == 2
