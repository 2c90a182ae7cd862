"""Prometheus metrics of the API and the controller, on a registry each `Metrics` owns.

Never the global default registry: two apps (or two tests) in one process must not clash.
The controller-runtime and client-go names and labels are kept exactly, so dashboards and
alerts written for Kubernetes controllers work unchanged (controller-runtime
`pkg/internal/controller/metrics`, client-go `util/workqueue/metrics.go`).

prometheus-client appends `_total` to counter names itself, so counters are named without it.

The store-derived gauges (api/store/metrics.py) are computed from the store when scraped, not
kept up to date by every writer: the API and the controller may be two processes on one data
dir, and only the store knows the truth for both. This module only offers them a slot
(`Metrics.store`) that /metrics refreshes before each scrape.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    platform_collector,
    process_collector,
)

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
# tofu_qemu_auth_failures_total{reason}: wrong credentials, an Authorization header that cannot
# be read, and the two 429s (too many failures; too many checks waiting).
AUTH_FAILURE_REASONS = ("invalid", "malformed", "throttled", "busy")


class ScrapeRefreshed(Protocol):
    """Gauges computed when scraped: /metrics calls `refresh()` first, within its own deadline,
    and counts a refresh that failed or timed out in `refresh_errors_total`."""

    @property
    def refresh_errors_total(self) -> Counter: ...

    async def refresh(self) -> None: ...


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
        # Gauges a scrape refreshes first (api/store/metrics.py attaches the store's).
        self.store: ScrapeRefreshed | None = None

        self._add_controller_runtime(registry)
        self._add_workqueue(registry)
        self._add_controller_side(registry)
        self._add_backend_side(registry)
        self._add_netguard(registry)
        self._create_first_series()

    def _add_controller_runtime(self, registry: CollectorRegistry) -> None:
        """controller-runtime's reconcile metrics, names and labels kept."""
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

    def _add_workqueue(self, registry: CollectorRegistry) -> None:
        """client-go's workqueue metrics, names and labels kept."""
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

    def _add_controller_side(self, registry: CollectorRegistry) -> None:
        """Ours, controller side: VM restarts, exit detection, starts, resyncs."""
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

    def _add_backend_side(self, registry: CollectorRegistry) -> None:
        """Ours, backend side: state writes and lock conflicts."""
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

    def _add_netguard(self, registry: CollectorRegistry) -> None:
        """Connection limits (api/server/connections.py), source failures (controller/sources.py)
        and authentication refusals."""
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

    def _create_first_series(self) -> None:
        """Series present from the start, as controller-runtime does, so rate() sees the first event."""
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
