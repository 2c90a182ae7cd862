"""The event log's one pruner per process that holds the store.

Both the API (its own events) and the controller record events, so neither owns the log's
retention. The composition root (controller/cli.py) opens the store once per process and starts
this pruner once beside whatever it serves: `api`, `controller` and `serve` alike, with no flag
deciding who prunes. Two processes on one data dir (`api` and `controller`) each prune; a prune
is one idempotent transaction, so they only repeat each other's work.
"""

from __future__ import annotations

import asyncio

from api.infra.metrics import Metrics
from api.infra.settings import ProcessSettings
from api.store import Database
from api.store.events import EventLog
from controller.sources import keep_running

SOURCE_NAME = "events-prune"


async def prune_events_until(
    stop: asyncio.Event, database: Database, settings: ProcessSettings, metrics: Metrics
) -> None:
    """Keep the event log of `database` within the retention of `settings` until `stop` is set:
    prune at once and then every EventLog period; a transient failure is counted in
    tofu_qemu_controller_source_errors_total{source="events-prune"} and retried with backoff."""
    events = EventLog(database, per_vm_limit=settings.events_per_vm, max_age=settings.events_max_age)
    failed = metrics.source_errors_total
    async with asyncio.TaskGroup() as tasks:
        pruning = tasks.create_task(
            keep_running(
                SOURCE_NAME, events.prune_forever, failed=lambda name: failed.labels(source=name).inc()
            ),
            name=SOURCE_NAME,
        )
        await stop.wait()
        pruning.cancel()
