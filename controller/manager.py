"""The controller: workers, event sources and the QEMU runtime under one TaskGroup.

Shutdown is drain, then cancel, then await: the queue stops taking keys, workers finish the
reconcile they are in, sources are cancelled, and the runtime lets go of its VMs without
stopping them (they are adopted by the next controller).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode

from api.infra.health import ReadinessCheck
from api.infra.metrics import CONTROLLER_NAME, Metrics
from api.store import Database
from api.store.allocations import Allocations
from api.store.events import EventLog
from api.store.fencing import StaleEpoch
from api.store.host_wakeups import listen_for_placements
from api.store.image_sources import ImageSources
from api.store.instancetypes import InstanceTypeCatalog
from api.store.snapshots import SnapshotStore
from api.store.status_writer import VMStatusWriter
from api.store.usage import UsageStore
from controller import guest_agents, watchdog
from controller.agent_freeze import freezer_of
from controller.clock import Clock, LoopClock
from controller.executor import Executor
from controller.host_agent import HostAgent, HostMetrics, Scheduler
from controller.image_gc import collect_images_forever
from controller.images.cache import ImageCache
from controller.layout import DataLayout
from controller.liveness_watch import watch_liveness
from controller.network import NetworkPolicy
from controller.project_index import ProjectIndex
from controller.qemu.accel import AccelResolver
from controller.qemu.argv import QEMU_BINARY
from controller.qemu.passt import Passt
from controller.qemu.passt_guard import passt_host_problem
from controller.qemu.runtime import Runtime
from controller.qemu.swtpm import Swtpm
from controller.queue import Backoff, QueueShutDown, WorkQueue
from controller.quota_gate import QuotaGate
from controller.reconciler import Outcome, Reconciler, Result
from controller.resources.disks import DiskManager
from controller.resources.nvram import NvramManager
from controller.resources.ports import PortAllocator
from controller.resync_inputs import IncrementalResync
from controller.self_fence import HostQemus
from controller.settings import ControllerSettings
from controller.snapshots import SnapshotController
from controller.sources import (
    RESYNC_WAIT_FLOOR_SECONDS,
    all_keys,
    keep_running,
    resync_forever,
    watch_store,
)
from controller.stop_all import wait_then_kill_the_rest
from controller.telemetry import RECONCILE_SPAN, TRACER, BootSpans, QueueMetrics
from controller.usage_sampler import UsageMetrics, UsageSampler

log = structlog.get_logger(__name__)
# A safety net above the per-call deadlines: no reconcile may hold its key longer.
RECONCILE_DEADLINE_SECONDS = 300.0
# On shutdown, reconciles in progress get this long to finish before they are cancelled.
DRAIN_SECONDS = 10.0
# After the shutdown timeout's SIGKILLs, how long their exits get to be recorded.
# /readyz fails when no full resync has finished within this many resync periods (and at least
# RESYNC_WAIT_FLOOR_SECONDS, which a short period could not honour).
RESYNC_PERIODS_BEFORE_UNREADY = 3


class Controller:
    def __init__(
        self,
        settings: ControllerSettings,
        db: Database,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._clock = clock or LoopClock()
        self._metrics = metrics or Metrics()
        # Loop times (asyncio clock) of the last heartbeat and the last finished resync.
        # True while the controller's task group runs (its `running` task is alive).
        self._running = False
        self._resynced_at: float | None = None
        self._shutting_down = False
        self._layout = DataLayout(settings.data_dir, settings.resolved_images_dir)
        # This host's VMs and ledger only: several controllers may share the store.
        self.host = HostAgent(
            settings,
            db,
            HostMetrics(self._metrics.registry),
            qemus=HostQemus(self._layout),
            wake=lambda uid: self.queue.add(uid),
        )
        store = self.host.store  # host-side writes: refused once the host's epoch moved on
        self._objects = VMStatusWriter(store, host=self.host.name)
        self._allocations = Allocations(store, host=self.host.name)
        self.events = EventLog(store, per_vm_limit=settings.events_per_vm, max_age=settings.events_max_age)
        self._projects = ProjectIndex(db)
        self._usage_metrics = UsageMetrics(self._metrics.registry, host=self.host.name)
        self.queue: WorkQueue[str] = WorkQueue(
            clock=self._clock,
            backoff=Backoff(base=settings.backoff_base_seconds, cap=settings.backoff_cap_seconds),
            observer=QueueMetrics(self._metrics),
            group_of=self._projects,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile until `stop` is set."""
        for directory in (self._layout.run_root, self._layout.disks_root, self._layout.images_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        first, last = self._settings.ports
        await self.host.register()
        scheduler = Scheduler(
            self._db,
            holder=self.host.name,
            lease_seconds=self._settings.host_lease_seconds,
            lost_grace=timedelta(seconds=self._settings.host_lost_grace_seconds),
        )
        with structlog.contextvars.bound_contextvars(host=self.host.name):
            await self._run_registered(stop, first, last, scheduler)

    async def _run_registered(self, stop: asyncio.Event, first: int, last: int, scheduler: Scheduler) -> None:
        async with asyncio.TaskGroup() as tasks:
            runtime = Runtime(
                clock=self._clock,
                wake=self.queue.add,
                tasks=tasks,
                guest_nice=self._settings.guest_nice,
                exit_detected=self._metrics.vm_exit_detect_seconds.observe,
            )
            tpms = Swtpm(clock=self._clock, wake=self.queue.add)
            passts = Passt(clock=self._clock, wake=self.queue.add)
            images = ImageCache(
                images_dir=self._layout.images_dir,
                sources=ImageSources(self._db),
                tasks=tasks,
                wake=self.queue.add,
                clock=self._clock,
                limits=self._settings.image_fetch_limits,
                egress=self._settings.image_egress,
            )
            await images.load()
            agents = guest_agents.of_runtime(runtime, wake=self.queue.add)
            network = NetworkPolicy(
                self._settings.guest_egress,
                await asyncio.to_thread(passt_host_problem, self._settings.guest_loopback_guard)
                if self._settings.guest_egress
                else "",
            )
            reconciler = self._reconciler(
                runtime, images, (tpms, passts), agents, ports=(first, last), network=network
            )
            sources = self._start_sources(tasks, runtime, images, scheduler, agents)
            workers = [
                tasks.create_task(self._work(reconciler), name=f"worker-{index}")
                for index in range(self._settings.workers)
            ]
            log.info("controller_started", workers=len(workers), data_dir=str(self._settings.data_dir))
            watchdog.notify("READY=1")
            await stop.wait()
            log.info("controller_stopping")
            await self._shut_down(runtime, images, (tpms, passts), workers, sources)

    def _reconciler(
        self,
        runtime: Runtime,
        images: ImageCache,
        helpers: tuple[Swtpm, Passt],
        agents: guest_agents.GuestAgents,
        *,
        ports: tuple[int, int],
        network: NetworkPolicy,
    ) -> Reconciler:
        """The reconcile pass and its executor; `helpers`: the VMs' swtpm and passt processes."""
        tpms, passts = helpers
        boots = BootSpans(self._metrics)
        first, last = ports
        executor = Executor(
            hypervisor=runtime,
            ports=PortAllocator(
                self._allocations, first=first, last=last, address=self._settings.forward_address
            ),
            disks=DiskManager(self._allocations, disks_dir=self._layout.disks_root),
            objects=self._objects,
            clock=self._clock,
            boots=boots,
            images=images,
            nvram=NvramManager(self._allocations),
            tpms=tpms,
            agents=agents,
            passts=passts,
            may_spawn=self.host.may_spawn,
        )
        instance_types = InstanceTypeCatalog.of(self._db, self._settings)
        quotas = self._quota_gate(instance_types, network)
        return Reconciler(
            objects=self._objects,
            allocations=self._allocations,
            hypervisor=runtime,
            executor=executor,
            accel=AccelResolver(
                images_dir=self._layout.images_dir, cache_file=self._settings.resolved_accel_cache
            ),
            layout=self._layout,
            clock=self._clock,
            boots=boots,
            quotas=quotas,
            memory_reserve_mib=self._settings.memory_reserve_mib,
            storage_reserve_mib=self._settings.storage_reserve_mib,
            # No timed look at running VMs: the liveness pass wakes the few that must be asked.
            liveness_period=None,
            forward_address=self._settings.forward_address,
            images=images,
            shutting_down=lambda: self._shutting_down,
            restarted=lambda reason: self._metrics.vm_restarts_total.labels(reason=reason).inc(),
            instance_types=instance_types,
            tpms=tpms,
            guests=agents,
            passts=passts,
        )

    def _quota_gate(self, instance_types: InstanceTypeCatalog, network: NetworkPolicy) -> QuotaGate:
        return QuotaGate(
            self._db,
            self._settings.quotas,
            port_range=self._settings.ports,
            clock=self._clock,
            sizes=instance_types,
            network=network,
            snapshots=SnapshotStore(self._db),
        )

    def _start_sources(
        self,
        tasks: asyncio.TaskGroup,
        runtime: Runtime,
        images: ImageCache,
        scheduler: Scheduler,
        agents: guest_agents.GuestAgents,
    ) -> list[asyncio.Task[None]]:
        """What runs beside the workers: the sources that queue keys (store commits, the resync,
        the liveness pass, the guest agents' poll, placements), the heartbeat /readyz watches, the
        image cache's garbage collection, the usage sampler, this host's lease and the scheduler."""
        grace = timedelta(seconds=self._settings.image_cache_grace_seconds)

        def resync() -> Coroutine[Any, Any, None]:
            return resync_forever(
                self._objects,
                self._allocations,
                self._layout,
                self.queue,
                self._projects,
                interval=self._settings.resync_seconds,
                finished=self._resync_finished,
                choose=self._incremental_resync(runtime),
            )

        def liveness() -> Coroutine[Any, Any, None]:
            return watch_liveness(
                runtime,
                period=self._settings.liveness_seconds,
                wake=self.queue.add,
                asked=self._metrics.liveness_asks_total.inc,
            )

        return [
            self._start_source(
                tasks, "watch-store", lambda: watch_store(self._db, self._objects, self.queue, self._projects)
            ),
            self._start_source(tasks, "resync", resync),
            self._start_source(tasks, "liveness", liveness),
            self._start_source(
                tasks,
                "guest-agents",
                lambda: guest_agents.watch_guest_agents(agents, period=self._settings.liveness_seconds),
            ),
            tasks.create_task(self._mark_running(), name="running"),
            self._start_source(
                tasks,
                "image-gc",
                lambda: collect_images_forever(self._db, self._allocations, images, grace=grace),
            ),
            self._start_source(tasks, "usage-sampler", self._usage_sampler(runtime).run),
            self._start_source(tasks, "host-lease", self.host.renew_forever),
            self._start_source(tasks, "host-fence", self.host.fence_forever),
            *watchdog.start_pinging(tasks),
            self._start_source(tasks, "scheduler", scheduler.run_forever),
            # snapshots: QemuVMSnapshot and QemuVMRestore (docs/snapshots.md).
            self._start_source(tasks, "snapshots", self._snapshots(runtime, agents).run_forever),
            *self._placement_wakeups(tasks),
        ]

    async def _shut_down(
        self,
        runtime: Runtime,
        images: ImageCache,
        helpers: tuple[Swtpm, Passt],
        workers: list[asyncio.Task[None]],
        sources: list[asyncio.Task[None]],
    ) -> None:
        """Drain, then cancel, then let go: stop the VMs first only if the settings say so."""
        if self._settings.stop_vms_on_exit:
            await self._stop_vms(runtime)
        self.queue.shut_down()
        _, unfinished = await asyncio.wait(workers, timeout=DRAIN_SECONDS)
        for task in [*unfinished, *sources]:
            task.cancel()
        await images.close()
        await runtime.close()
        for helper in helpers:
            await helper.close()

    def _usage_sampler(self, runtime: Runtime) -> UsageSampler:
        def running() -> dict[str, int]:
            records = {uid: runtime.attached_record(uid) for uid in runtime.attached_uids()}
            return {uid: record.pid for uid, record in records.items() if record is not None}

        return UsageSampler(
            UsageStore(self._db),
            running,
            self._usage_metrics,
            period=self._settings.usage_sample_seconds,
            retention=timedelta(days=self._settings.usage_retention_days),
            minutes_retention=timedelta(hours=self._settings.usage_minutes_retention_hours),
        )

    def _snapshots(self, runtime: Runtime, agents: guest_agents.GuestAgents) -> SnapshotController:
        return SnapshotController(
            self._db,
            host=self.host.name,
            runtime=runtime,
            now=self._clock.now,
            quotas=self._settings.quotas,
            freezer=freezer_of(agents, runtime, self._layout),
        )

    def _incremental_resync(self, runtime: Runtime) -> IncrementalResync:
        return IncrementalResync(
            layout=self._layout,
            watched=runtime.attached_record,
            full_every=self._settings.full_resync_seconds,
            clock=self._clock,
            metrics=self._metrics,
        )

    def _placement_wakeups(self, tasks: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """On PostgreSQL: queue a VM as soon as the scheduler places it here (or a drain takes
        it away), from a dedicated LISTEN connection (api/store/host_wakeups.py)."""
        url = self._settings.database_url
        if url is None:
            return []
        return [
            self._start_source(
                tasks, "placement-wakeups", lambda: listen_for_placements(url, self.host.name, self.queue.add)
            )
        ]

    def _start_source(
        self, tasks: asyncio.TaskGroup, name: str, source: Callable[[], Awaitable[None]]
    ) -> asyncio.Task[None]:
        """Run an event source in `tasks`, retried after transient failures (sources.keep_running)."""
        failed = self._metrics.source_errors_total
        return tasks.create_task(
            keep_running(name, source, failed=lambda source_name: failed.labels(source=source_name).inc()),
            name=name,
        )

    async def _stop_vms(self, runtime: Runtime) -> None:
        """Stop every VM through the reconcile loop (power button, quit, kill, as a stop always
        goes), and wait for them, at most shutdown_timeout_seconds. Nothing is started meanwhile.

        The stops are recorded as the controller's, so the next start boots the VMs again
        without counting a restart or a failure.
        """
        self._shutting_down = True
        for uid in sorted(await all_keys(self._objects, self._allocations, self._layout)):
            self.queue.add(uid)
        timeout = self._settings.shutdown_timeout_seconds
        log.info("stopping_vms", count=len(runtime.attached_uids()), timeout=timeout)
        await wait_then_kill_the_rest(runtime, timeout)

    def readiness_checks(self) -> dict[str, ReadinessCheck]:
        """Checks for /readyz: each returns None when fine, else what is wrong."""
        return {"controller": self._check_alive, "resync": self._check_resync, "qemu": self._check_qemu}

    async def _check_alive(self) -> str | None:
        return None if self._running else "the controller loop is not running"

    async def _check_resync(self) -> str | None:
        now = asyncio.get_running_loop().time()
        limit = max(RESYNC_PERIODS_BEFORE_UNREADY * self._settings.resync_seconds, RESYNC_WAIT_FLOOR_SECONDS)
        if self._resynced_at is None:
            return "no full resync has finished yet"
        if now - self._resynced_at > limit:
            return f"the last full resync finished {now - self._resynced_at:.0f} s ago (limit {limit:.0f} s)"
        return None

    async def _check_qemu(self) -> str | None:
        return None if shutil.which(QEMU_BINARY) else f"{QEMU_BINARY} is not on PATH"

    def _resync_finished(self, seconds: float) -> None:
        self._resynced_at = asyncio.get_running_loop().time()
        self._metrics.resync_duration_seconds.observe(seconds)
        log.debug("resync_finished", seconds=round(seconds, 3))

    async def _mark_running(self) -> None:
        """Say the controller runs for as long as its task group does: cancelled with the
        others when it ends or fails. No timer: an idle controller wakes for nothing."""
        self._running = True
        try:
            await asyncio.Event().wait()
        finally:
            self._running = False

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
        """One reconcile under its own root span, counted as controller-runtime counts it."""
        started = self._clock.monotonic()
        with (
            structlog.contextvars.bound_contextvars(uid=uid),
            TRACER.start_as_current_span(
                RECONCILE_SPAN, context=Context(), attributes={"tofu_qemu.uid": uid}
            ) as span,
        ):
            label = self._requeue(await self._reconcile_guarded(reconciler, uid), uid, span)
        self._metrics.reconcile_total.labels(controller=CONTROLLER_NAME, result=label).inc()
        if label == "error":
            self._metrics.reconcile_errors_total.labels(controller=CONTROLLER_NAME).inc()
        self._metrics.reconcile_time_seconds.labels(controller=CONTROLLER_NAME).observe(
            self._clock.monotonic() - started
        )

    async def _reconcile_guarded(self, reconciler: Reconciler, uid: str) -> Result | None:
        """The reconcile's result, or None when it raised (a bug; logged, retried with backoff)."""
        try:
            async with asyncio.timeout(RECONCILE_DEADLINE_SECONDS):
                return await reconciler.reconcile(uid)
        except StaleEpoch as err:
            # Not a bug: this host was fenced; the host agent recovers, then the retry succeeds.
            log.warning("reconcile_fenced", error=str(err))
            return None
        except Exception as err:
            span = trace.get_current_span()
            span.record_exception(err)
            span.set_status(Status(StatusCode.ERROR, f"{type(err).__name__}: {err}"))
            log.exception("reconcile_crashed")
            return None

    def _requeue(self, result: Result | None, uid: str, span: Span) -> str:
        """Queue `uid` again as the result asks; returns controller-runtime's result label."""
        if result is None or result.outcome is Outcome.TRANSIENT_ERROR:
            delay = self.queue.add_rate_limited(uid)
            span.set_attributes({"tofu_qemu.result": "error", "tofu_qemu.requeue_after_seconds": delay})
            if result is not None:
                span.set_status(Status(StatusCode.ERROR, result.error or "transient error"))
                log.warning("reconcile_failed", error=result.error, retry_in=round(delay, 3))
            return "error"
        self.queue.forget(uid)
        if result.outcome is Outcome.TERMINAL_ERROR:
            span.set_attribute("tofu_qemu.result", "terminal")
            span.set_status(Status(StatusCode.ERROR, result.error or "terminal error"))
            log.warning("reconcile_terminal", error=result.error)
            return "error"
        if result.requeue_after is None:
            span.set_attribute("tofu_qemu.result", "success")
            return "success"
        delay = max(result.requeue_after, timedelta(0)).total_seconds()
        self.queue.add_after(uid, delay)
        span.set_attributes({"tofu_qemu.result": "requeue", "tofu_qemu.requeue_after_seconds": delay})
        return "requeue_after" if delay > 0 else "requeue"
