"""Event sources. Each turns something that happened into `queue.add(uid)`, nothing more.

- store changes: in-process notification after every commit, plus `data_version` polling
  (SQLite's PRAGMA, PostgreSQL's LISTEN/NOTIFY count) for writes by another process
  (`tofu-qemu api` + `tofu-qemu controller`);
- process exits and QMP events: the runtime calls `queue.add` itself (controller/qemu/runtime.py);
- a periodic full resync, which also finds orphans (runtime dirs or ledger rows with no object).

Every source runs under `keep_running`: a transient failure (no file descriptor left, a full
or briefly unreadable disk, a store that did not answer) is logged, counted and retried with
backoff, never allowed to end the controller's TaskGroup and leave VMs unmanaged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import structlog

from api.store import Database
from api.store.allocations import Allocations
from api.store.records import DiskRow, PortRow
from api.store.sql import FAILURES
from api.store.status_writer import VMStatusWriter
from controller.layout import DataLayout
from controller.project_index import ProjectIndex
from controller.queue import WorkQueue

log = structlog.get_logger(__name__)
STORE_POLL_SECONDS = 1.0
SOURCE_RETRY_FIRST_SECONDS = 1.0
SOURCE_RETRY_CAP_SECONDS = 30.0
# What a source may meet and live through: OSError (EMFILE, ENOSPC, EIO), either database's
# errors and the store's own (StoreUnavailable while PostgreSQL is away).
TRANSIENT_ERRORS = (OSError, *FAILURES)
# The least time a resync is given to finish, and the readiness check's least tolerance.
RESYNC_WAIT_FLOOR_SECONDS = 30.0


async def keep_running(
    name: str,
    source: Callable[[], Awaitable[None]],
    *,
    failed: Callable[[str], None],
    first_delay: float = SOURCE_RETRY_FIRST_SECONDS,
    cap: float = SOURCE_RETRY_CAP_SECONDS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Run `source()` (a loop that runs until cancelled) and run it again after a transient
    failure: `failed(name)` counts it, the delay doubles from `first_delay` up to `cap`, and
    starts over once the source has run `cap` seconds without failing. Other errors are bugs
    and propagate."""
    loop = asyncio.get_running_loop()
    delay = first_delay
    while True:
        started = loop.time()
        try:
            await source()
            return
        except TRANSIENT_ERRORS as err:
            if loop.time() - started >= cap:
                delay = first_delay
            failed(name)
            log.warning("source_failed", source=name, error=f"{type(err).__name__}: {err}", retry_in=delay)
        await sleep(delay)
        delay = min(delay * 2, cap)


@dataclass(frozen=True, slots=True)
class Inventory:
    """What one resync read: every object's resourceVersion, runtime dir and ledger row."""

    versions: Mapping[str, int]
    runtime_uids: frozenset[str]
    ports: Sequence[PortRow]
    disks: Sequence[DiskRow]

    def uids(self) -> set[str]:
        """Every uid that may need work: objects, runtime dirs, and ledger rows."""
        keys = set(self.versions) | self.runtime_uids
        keys |= {row.uid for row in self.ports}
        keys |= {row.uid for row in self.disks}
        return keys


async def take_inventory(objects: VMStatusWriter, allocations: Allocations, layout: DataLayout) -> Inventory:
    return Inventory(
        versions=await objects.versions(),
        runtime_uids=frozenset(layout.runtime_uids()),
        ports=await allocations.ports(),
        disks=await allocations.disks(),
    )


async def all_keys(objects: VMStatusWriter, allocations: Allocations, layout: DataLayout) -> set[str]:
    """Every uid that may need work: objects, runtime dirs, and ledger rows."""
    return (await take_inventory(objects, allocations, layout)).uids()


async def watch_store(
    db: Database, objects: VMStatusWriter, queue: WorkQueue[str], projects: ProjectIndex
) -> None:
    """Queue every object whose resourceVersion changed, except by the controller's own status
    writes (they change nothing the reconciler acts on). `projects` learns new uids' projects
    first, so the queue is fair across projects from a VM's first reconcile on."""
    changed = asyncio.Event()
    # Not woken by status and event writes (the controller's own): they change nothing it acts on.
    db.subscribe(changed.set, volatile=False)
    seen: dict[str, int] = {}
    last_data_version = await db.data_version()
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STORE_POLL_SECONDS):
                await changed.wait()
        # Notified: this process committed, so look at once. Timed out: ask the store whether
        # another process (split mode) committed before reading every version.
        if changed.is_set():
            changed.clear()
        else:
            data_version = await db.data_version()
            if data_version == last_data_version and seen:
                continue
            last_data_version = data_version
        current = await objects.versions()
        changed_uids = [
            uid
            for uid, version in current.items()
            if seen.get(uid) != version and objects.written_versions.get(uid) != version
        ]
        await projects.learn(changed_uids)
        # An object gone from the list (finalized, or placed away from this host by a drain)
        # is looked at once more, so what this host still holds for it is released now.
        for uid in [*changed_uids, *(uid for uid in seen if uid not in current)]:
            queue.add(uid)
        seen = current


async def resync_forever(
    objects: VMStatusWriter,
    allocations: Allocations,
    layout: DataLayout,
    queue: WorkQueue[str],
    projects: ProjectIndex,
    *,
    interval: float,
    finished: Callable[[float], None] = lambda _seconds: None,
    choose: Callable[[Inventory], Collection[str]] | None = None,
) -> None:
    """Queue every key now and every `interval` seconds: drift is corrected even without events.

    `choose(inventory)`: the keys of this pass to queue (controller/resync.py queues only those
    whose inputs changed, and every key on a longer period); None queues every key.
    `finished(seconds)` is called when every queued key of a resync has been reconciled once:
    readiness ("the last resync finished recently") and the resync duration metric come from it.
    """
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        inventory = await take_inventory(objects, allocations, layout)
        every = sorted(inventory.uids())
        projects.keep_only(every)
        keys = every if choose is None else sorted(choose(inventory))
        await projects.learn(keys)
        for uid in keys:
            queue.add(uid)
        try:
            # Even with a period shorter than one pass, each pass is waited for: a resync that
            # never counts as finished would make the controller look stuck.
            async with asyncio.timeout(max(interval, RESYNC_WAIT_FLOOR_SECONDS)):
                await queue.wait_done(keys)
            finished(loop.time() - started)
        except TimeoutError:
            pass  # a reconcile is stuck: readiness will say so
        await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
