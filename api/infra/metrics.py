"""Prometheus metrics of the API and the controller, on a registry each `Metrics` owns.

Never the global default registry: two apps (or two tests) in one process must not clash.
The controller-runtime and client-go names and labels are kept exactly, so dashboards and
alerts written for Kubernetes controllers work unchanged (controller-runtime
`pkg/internal/controller/metrics`, client-go `util/workqueue/metrics.go`).

prometheus-client appends `_total` to counter names itself, so counters are named without it.

The store-derived gauges (`StoreMetrics`) are computed from SQLite when scraped, not kept up to
date by every writer: the API and the controller may be two processes on one data dir, and
only the store knows the truth for both.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    platform_collector,
    process_collector,
)

from api.store.db import Database
from api.store.fleet import VMGroup, fleet_snapshot
from api.types import Phase

CONTROLLER_NAME = "qemuvm"
WORKQUEUE_NAME = CONTROLLER_NAME
# controller-runtime's `result` label values.
RECONCILE_RESULTS = ("success", "error", "requeue", "requeue_after")

# 1 ms to 60 s: a reconcile that only reads is milliseconds, one that starts QEMU is seconds.
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# client-go uses decades; in asyncio nothing below 10 µs is measurable.
WORKQUEUE_BUCKETS = (1e-5, 1e-4, 1e-3, 0.01, 0.1, 1, 10, 100)
EXIT_DETECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
VM_START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
MIB = 1024 * 1024
# tofu_qemu_auth_failures_total{reason}: wrong credentials, an Authorization header that cannot
# be read, and the two 429s (too many failures; too many checks waiting).
AUTH_FAILURE_REASONS = ("invalid", "malformed", "throttled", "busy")


class Metrics:
    """Every metric the API and the controller update, registered on `registry`.

    Without `registry` a new one is made, with the process, platform and GC collectors that the
    default registry would have had. A given registry gets only the metrics below.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            process_collector.ProcessCollector(registry=registry)
            platform_collector.PlatformCollector(registry=registry)
            gc_collector.GCCollector(registry=registry)
        self.registry = registry
        self.store: StoreMetrics | None = None

        # controller-runtime
        self.reconcile_total = Counter(
            "controller_runtime_reconcile",
            "Total number of reconciliations per controller",
            ("controller", "result"),
            registry=registry,
        )
        self.reconcile_errors_total = Counter(
            "controller_runtime_reconcile_errors",
            "Total number of reconciliation errors per controller",
            ("controller",),
            registry=registry,
        )
        self.reconcile_time_seconds = Histogram(
            "controller_runtime_reconcile_time_seconds",
            "Length of time per reconciliation per controller",
            ("controller",),
            buckets=RECONCILE_BUCKETS,
            registry=registry,
        )
        # client-go workqueue
        self.workqueue_depth = Gauge(
            "workqueue_depth", "Current depth of workqueue", ("name",), registry=registry
        )
        self.workqueue_adds_total = Counter(
            "workqueue_adds", "Total number of adds handled by workqueue", ("name",), registry=registry
        )
        self.workqueue_retries_total = Counter(
            "workqueue_retries", "Total number of retries handled by workqueue", ("name",), registry=registry
        )
        self.workqueue_queue_duration_seconds = Histogram(
            "workqueue_queue_duration_seconds",
            "How long in seconds an item stays in workqueue before being requested",
            ("name",),
            buckets=WORKQUEUE_BUCKETS,
            registry=registry,
        )
        self.workqueue_work_duration_seconds = Histogram(
            "workqueue_work_duration_seconds",
            "How long in seconds processing an item from workqueue takes",
            ("name",),
            buckets=WORKQUEUE_BUCKETS,
            registry=registry,
        )
        # ours, controller side
        self.vm_restarts_total = Counter(
            "tofu_qemu_vm_restarts", "VM processes started again, by reason", ("reason",), registry=registry
        )
        self.vm_exit_detect_seconds = Histogram(
            "tofu_qemu_vm_exit_detect_seconds",
            "From a QEMU process exiting to the controller noticing it",
            buckets=EXIT_DETECT_BUCKETS,
            registry=registry,
        )
        self.vm_start_seconds = Histogram(
            "tofu_qemu_vm_start_seconds",
            "From spawning QEMU to the VM being Running",
            buckets=VM_START_BUCKETS,
            registry=registry,
        )
        self.resync_duration_seconds = Histogram(
            "tofu_qemu_resync_duration_seconds",
            "Length of one resync pass, until every key it queued was reconciled once",
            buckets=RECONCILE_BUCKETS,
            registry=registry,
        )
        # liveness: the QEMUs the /proc look could not vouch for and asked over QMP
        # (controller/liveness_watch.py), and the keys each resync queued or skipped as
        # unchanged (controller/resync.py).
        self.liveness_asks_total = Counter(
            "tofu_qemu_liveness_asks",
            "Watched QEMUs the liveness pass asked over QMP because /proc did not show them idle",
            registry=registry,
        )
        self.resync_keys_total = Counter(
            "tofu_qemu_resync_keys",
            "Keys a resync pass looked at, by outcome: queued (changed, or a full pass) or skipped",
            ("outcome",),
            registry=registry,
        )
        # ours, backend side
        self.state_writes_total = Counter(
            "tofu_qemu_state_writes",
            "States stored (POST/PUT accepted), by project",
            ("project",),
            registry=registry,
        )
        self.lock_conflicts_total = Counter(
            "tofu_qemu_lock_conflicts",
            "LOCK requests refused because another ID holds the lock",
            ("project",),
            registry=registry,
        )
        # netguard: connection limits (api/server/connections.py) and source failures
        # (controller/sources.py).
        self.http_connections = Gauge(
            "tofu_qemu_http_connections",
            "HTTP connections open, by listener",
            ("listener",),
            registry=registry,
        )
        self.http_connections_closed_total = Counter(
            "tofu_qemu_http_connections_closed",
            "HTTP connections the server closed to protect itself, by reason "
            "(header_timeout, evicted, refused)",
            ("listener", "reason"),
            registry=registry,
        )
        self.source_errors_total = Counter(
            "tofu_qemu_controller_source_errors",
            "Failures of an event source (store watch, resync, image GC, event pruning), retried",
            ("source",),
            registry=registry,
        )

        self.auth_failures_total = Counter(
            "tofu_qemu_auth_failures",
            "Requests refused by authentication, by reason: invalid, malformed, throttled, busy",
            ("reason",),
            registry=registry,
        )

        # Series present from the start, as controller-runtime does, so rate() sees the first event.
        for result in RECONCILE_RESULTS:
            self.reconcile_total.labels(controller=CONTROLLER_NAME, result=result)
        self.reconcile_errors_total.labels(controller=CONTROLLER_NAME)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures_total.labels(reason=reason)
        for queue_metric in (
            self.workqueue_depth,
            self.workqueue_adds_total,
            self.workqueue_retries_total,
            self.workqueue_queue_duration_seconds,
            self.workqueue_work_duration_seconds,
        ):
            queue_metric.labels(name=WORKQUEUE_NAME)

    def attach_store(self, db: Database) -> StoreMetrics:
        """Export the store-derived gauges of `db`; calling again with the same `db` is a no-op.

        :raise ValueError: another store is already attached (one registry, one set of gauges).
        """
        if self.store is None:
            self.store = StoreMetrics(db, registry=self.registry)
        elif self.store.db is not db:
            raise ValueError("these metrics already export another store")
        return self.store


class StoreMetrics:
    """Gauges computed from the SQLite store by `refresh()`, run before each scrape.

    Each refresh replaces every labelled series, so a project or phase with no VMs left
    disappears instead of freezing at its last value.
    """

    def __init__(self, db: Database, *, registry: CollectorRegistry) -> None:
        self.db = db
        self.vms = Gauge(
            "tofu_qemu_vms",
            "VM objects by project and phase (deleting ones included)",
            ("project", "phase"),
            registry=registry,
        )
        self.memory_requested_bytes = Gauge(
            "tofu_qemu_memory_requested_bytes",
            "Memory in the valid specs of live VMs",
            ("project",),
            registry=registry,
        )
        self.memory_running_bytes = Gauge(
            "tofu_qemu_memory_running_bytes",
            "Memory in the specs of Running VMs",
            ("project",),
            registry=registry,
        )
        self.vcpus_requested = Gauge(
            "tofu_qemu_vcpus_requested",
            "vCPUs in the valid specs of live VMs",
            ("project",),
            registry=registry,
        )
        self.vcpus_running = Gauge(
            "tofu_qemu_vcpus_running", "vCPUs in the specs of Running VMs", ("project",), registry=registry
        )
        self.host_ports_in_use = Gauge(
            "tofu_qemu_host_ports_in_use", "Host ports held by VMs", registry=registry
        )
        self.state_bytes = Gauge(
            "tofu_qemu_state_bytes", "Size of each project's current state", ("project",), registry=registry
        )
        self.refresh_errors_total = Counter(
            "tofu_qemu_store_metrics_refresh_errors",
            "Scrapes that served the store-derived gauges stale because the store did not answer",
            registry=registry,
        )

    async def refresh(self) -> None:
        """Read the store and replace every gauge. Nothing changes when a query fails.

        :raise sql.DatabaseError, StoreUnavailable: a query failed. :raise ValueError: the database is closed.
        """
        snapshot = await fleet_snapshot(self.db)
        # No await from here on: a concurrent scrape never sees half-replaced gauges.
        self._set_vm_gauges(snapshot.vm_groups)
        self.host_ports_in_use.set(snapshot.host_ports_in_use)
        self.state_bytes.clear()
        for project, size in snapshot.state_bytes.items():
            self.state_bytes.labels(project=project).set(size)

    def _set_vm_gauges(self, groups: list[VMGroup]) -> None:
        counts: dict[tuple[str, str], int] = defaultdict(int)
        requested: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        running: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for group in groups:
            counts[group.project, group.phase] += group.count
            if group.is_live:
                requested[group.project][0] += group.memory_mib
                requested[group.project][1] += group.cpus
            if group.phase == Phase.RUNNING.value:
                running[group.project][0] += group.memory_mib
                running[group.project][1] += group.cpus
        for gauge in (
            self.vms,
            self.memory_requested_bytes,
            self.memory_running_bytes,
            self.vcpus_requested,
            self.vcpus_running,
        ):
            gauge.clear()
        for (project, phase), count in counts.items():
            self.vms.labels(project=project, phase=phase).set(count)
        for project, (memory_mib, cpus) in requested.items():
            self.memory_requested_bytes.labels(project=project).set(memory_mib * MIB)
            self.vcpus_requested.labels(project=project).set(cpus)
        for project, (memory_mib, cpus) in running.items():
            self.memory_running_bytes.labels(project=project).set(memory_mib * MIB)
            self.vcpus_running.labels(project=project).set(cpus)
