"""Gauges derived from the store (VMs by phase, requested and running memory and vCPUs, ports,
state sizes), refreshed from the store before each scrape and exported on a process's `Metrics`.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge

from api.infra.metrics import Metrics
from api.store.db import Database
from api.store.fleet import VMGroup, fleet_snapshot
from api.types import Phase

MIB = 1024 * 1024


def attach_store_metrics(metrics: Metrics, db: Database) -> StoreMetrics:
    """Export the store-derived gauges of `db` on `metrics`; again with the same `db` is a no-op.

    :raise ValueError: another store is already attached (one registry, one set of gauges).
    """
    if metrics.store is None:
        created = StoreMetrics(db, registry=metrics.registry)
        metrics.store = created
        return created
    if isinstance(metrics.store, StoreMetrics) and metrics.store.db is db:
        return metrics.store
    raise ValueError("these metrics already export another store")


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
