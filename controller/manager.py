"""The controller: workers, event sources and the QEMU runtime under one TaskGroup.

Shutdown is drain, then cancel, then await: the queue stops taking keys, workers finish the
reconcile they are in, sources are cancelled, and the runtime lets go of its VMs without
stopping them (they are adopted by the next controller).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog

from api.store import Database
from api.store.allocations import Allocations
from api.store.status_writer import VMStatusWriter
from controller.clock import Clock, LoopClock
from controller.executor import Executor
from controller.layout import DataLayout
from controller.qemu.accel import AccelResolver
from controller.qemu.runtime import Runtime
from controller.queue import Backoff, QueueShutDown, WorkQueue
from controller.reconciler import Outcome, Reconciler
from controller.resources.disks import DiskManager
from controller.resources.ports import PortAllocator
from controller.settings import ControllerSettings
from controller.sources import resync_forever, watch_store

log = structlog.get_logger(__name__)
# A safety net above the per-call deadlines: no reconcile may hold its key longer.
RECONCILE_DEADLINE_SECONDS = 300.0
# On shutdown, reconciles in progress get this long to finish before they are cancelled.
DRAIN_SECONDS = 10.0


class Controller:
    def __init__(self, settings: ControllerSettings, db: Database, *, clock: Clock | None = None) -> None:
        self._settings = settings
        self._db = db
        self._clock = clock or LoopClock()
        self._layout = DataLayout(settings.data_dir, settings.resolved_images_dir)
        self._objects = VMStatusWriter(db)
        self._allocations = Allocations(db)
        self.queue: WorkQueue[str] = WorkQueue(
            clock=self._clock,
            backoff=Backoff(base=settings.backoff_base_seconds, cap=settings.backoff_cap_seconds),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile until `stop` is set."""
        for directory in (self._layout.run_root, self._layout.disks_root, self._layout.images_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        first, last = self._settings.ports
        async with asyncio.TaskGroup() as tasks:
            runtime = Runtime(
                clock=self._clock, wake=self.queue.add, tasks=tasks, guest_nice=self._settings.guest_nice
            )
            executor = Executor(
                runtime=runtime,
                ports=PortAllocator(self._allocations, first=first, last=last),
                disks=DiskManager(
                    self._allocations, images_dir=self._layout.images_dir, disks_dir=self._layout.disks_root
                ),
                objects=self._objects,
                clock=self._clock,
            )
            reconciler = Reconciler(
                objects=self._objects,
                allocations=self._allocations,
                runtime=runtime,
                executor=executor,
                accel=AccelResolver(
                    images_dir=self._layout.images_dir, cache_file=self._settings.resolved_accel_cache
                ),
                layout=self._layout,
                clock=self._clock,
            )
            sources = [
                tasks.create_task(watch_store(self._db, self._objects, self.queue), name="watch-store"),
                tasks.create_task(
                    resync_forever(
                        self._objects,
                        self._allocations,
                        self._layout,
                        self.queue,
                        interval=self._settings.resync_seconds,
                    ),
                    name="resync",
                ),
            ]
            workers = [
                tasks.create_task(self._work(reconciler), name=f"worker-{index}")
                for index in range(self._settings.workers)
            ]
            log.info("controller_started", workers=len(workers), data_dir=str(self._settings.data_dir))
            await stop.wait()
            log.info("controller_stopping")
            self.queue.shut_down()
            _, unfinished = await asyncio.wait(workers, timeout=DRAIN_SECONDS)
            for worker in unfinished:
                worker.cancel()
            for source in sources:
                source.cancel()
            await runtime.close()

    async def _work(self, reconciler: Reconciler) -> None:
        while True:
            try:
                uid = await self.queue.get()
            except QueueShutDown:
                return
            try:
                await self._reconcile_one(reconciler, uid)
            finally:
                self.queue.done(uid)

    async def _reconcile_one(self, reconciler: Reconciler, uid: str) -> None:
        with structlog.contextvars.bound_contextvars(uid=uid):
            try:
                async with asyncio.timeout(RECONCILE_DEADLINE_SECONDS):
                    result = await reconciler.reconcile(uid)
            except Exception:
                log.exception("reconcile_crashed")
                self.queue.add_rate_limited(uid)
                return
            if result.outcome is Outcome.TRANSIENT_ERROR:
                delay = self.queue.add_rate_limited(uid)
                log.warning("reconcile_failed", error=result.error, retry_in=round(delay, 3))
                return
            self.queue.forget(uid)
            if result.outcome is Outcome.TERMINAL_ERROR:
                log.warning("reconcile_terminal", error=result.error)
            elif result.requeue_after is not None:
                self.queue.add_after(uid, max(result.requeue_after, timedelta(0)).total_seconds())
