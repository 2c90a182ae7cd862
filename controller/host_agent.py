"""This controller's host: its registration and lease, and the one scheduler among controllers.

`HostAgent` registers the host when the controller starts and renews its lease every
host_lease_seconds / 3 with the database's clock; a host that stops renewing is NotReady once
the lease runs out (docs/multi-host.md). `Scheduler` runs in every controller, but only the
holder of the `scheduler` lease places VMs (controller/placement.py); on SQLite that is the
one controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from datetime import datetime, timedelta

import structlog
from prometheus_client import CollectorRegistry, Gauge

from api.hosts import Host, Resources
from api.store import Database
from api.store.hosts import Hosts, Leases, Registration
from api.store.sql import Dialect
from controller import host_memory
from controller.placement import lost_hosts, lost_notes, place
from controller.settings import ControllerSettings
from controller.telemetry import TRACER

log = structlog.get_logger(__name__)
SCHEDULER_LEASE = "scheduler"
# How often the scheduler looks for other processes' writes (as the store watch does).
SCHEDULER_POLL_SECONDS = 1.0
# Renewals per lease period: two may fail before the lease runs out.
RENEWALS_PER_LEASE = 3


class HostMetrics:
    """tofu_qemu_hosts{ready}, each host's lease age and capacity, as this controller last read them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.hosts = Gauge("tofu_qemu_hosts", "Registered hosts, Ready or not", ("ready",), registry=registry)
        self.lease_age = Gauge(
            "tofu_qemu_host_lease_age_seconds",
            "Seconds since each host last renewed its lease (database clock)",
            ("host",),
            registry=registry,
        )
        self.capacity = Gauge(
            "tofu_qemu_host_capacity",
            "What each host offers VMs: cpus, memory_mib and ports (its port range)",
            ("host", "resource"),
            registry=registry,
        )

    def update(self, hosts: list[Host], now: datetime) -> None:
        ready = sum(1 for host in hosts if host.ready(now))
        self.hosts.labels(ready="true").set(ready)
        self.hosts.labels(ready="false").set(len(hosts) - ready)
        self.lease_age.clear()
        self.capacity.clear()
        for host in hosts:
            self.lease_age.labels(host=host.name).set(host.lease_age(now))
            for resource, amount in host.capacity.by_resource().items():
                self.capacity.labels(host=host.name, resource=resource).set(amount)


def host_capacity(settings: ControllerSettings) -> Resources:
    """What this host offers: its CPUs, memory (MemTotal or the cgroup's limit) and port range."""
    first, last = settings.ports
    return Resources(
        cpus=len(os.sched_getaffinity(0)),
        memory_mib=host_memory.capacity_mib() or 0,
        ports=last - first + 1,
    )


class HostAgent:
    def __init__(self, settings: ControllerSettings, db: Database, metrics: HostMetrics) -> None:
        self.name = settings.resolved_host_name
        self._registration = Registration(
            name=self.name,
            labels=settings.labels,
            capacity=host_capacity(settings),
            lease_seconds=settings.host_lease_seconds,
        )
        self._hosts = Hosts(db)
        self._db = db
        self._metrics = metrics

    async def register(self) -> Host:
        """Register the host; the only host also adopts what was stored before hosts existed."""
        host = await self._hosts.register(self._registration)
        if self._db.dialect is Dialect.SQLITE:
            renamed = await self._hosts.take_over_renamed(self.name)
            if renamed:
                log.warning("host_renamed", host=self.name, previously=renamed)
        if await self._hosts.adopt_legacy(self.name):
            log.debug("host_adopted_legacy_rows", host=self.name)
        log.info("host_registered", host=self.name, epoch=host.epoch, capacity=host.capacity.to_json())
        return host

    async def renew_forever(self) -> None:
        """Renew the lease every host_lease_seconds / 3; register again if the row is gone."""
        period = self._registration.lease_seconds / RENEWALS_PER_LEASE
        while True:
            await asyncio.sleep(period)
            if not await self._hosts.renew(self.name):
                await self.register()
            self._metrics.update(await self._hosts.all(), await self._db.database_now())


class Scheduler:
    """Places unplaced VMs while this controller holds the scheduler lease."""

    def __init__(
        self,
        db: Database,
        *,
        holder: str,
        lease_seconds: float,
        lost_grace: timedelta = timedelta(seconds=30),
    ) -> None:
        self._db = db
        self._lost_grace = lost_grace
        self._holder = holder
        self._lease_seconds = lease_seconds
        self._hosts = Hosts(db)
        self._leases = Leases(db)

    async def run_forever(self) -> None:
        """A pass at every commit of this process, at other processes' commits (polled), and
        at least every lease / 3, which also renews the lease."""
        changed = asyncio.Event()
        self._db.subscribe(changed.set)
        loop = asyncio.get_running_loop()
        renew_every = self._lease_seconds / RENEWALS_PER_LEASE
        last_version: int | None = None
        leased_at = passed_at = looked_at = -renew_every
        leader = False
        while True:
            # Woken by a commit of this process, the pass runs anyway: no need to ask SQLite.
            version = last_version if changed.is_set() else await self._db.data_version()
            if loop.time() - leased_at >= renew_every:
                leader = await self._take_lease(leader)
                leased_at = loop.time()
            # A lost host commits nothing: a pass every lease / 3 notices it all the same.
            due = changed.is_set() or version != last_version or loop.time() - passed_at >= renew_every
            if leader and due:
                changed.clear()
                last_version, passed_at = version, loop.time()
                # Most commits are status writes, which free or take no room: such a pass reads
                # no host unless a VM waits. Lost hosts are looked for every lease / 3 all the same.
                look_for_lost = passed_at - looked_at >= renew_every
                looked_at = passed_at if look_for_lost else looked_at
                await self.schedule_once(look_for_lost=look_for_lost)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(SCHEDULER_POLL_SECONDS, renew_every)):
                    await changed.wait()

    async def _take_lease(self, was_leader: bool) -> bool:
        leader = await self._leases.hold(SCHEDULER_LEASE, self._holder, self._lease_seconds)
        if leader != was_leader:
            log.info("scheduler_lease", holder=self._holder, held=leader)
        return leader

    async def schedule_once(self, *, look_for_lost: bool = True) -> int:
        """One placement pass over every live VM; returns how many were placed. VMs of a host
        lost for host_lost_grace_seconds get HostReady=False (they are not moved yet); without
        `look_for_lost`, only when some VM waits for a host or a note."""
        if not look_for_lost and not await self._hosts.anything_to_schedule():
            return 0
        hosts = await self._hosts.all()
        now = await self._db.database_now()
        lost = lost_hosts(hosts, now, self._lost_grace)
        if not lost and not await self._hosts.anything_to_schedule():
            return 0  # every VM placed on a live host, no note to clear: nothing to read
        vms = await self._hosts.placed()
        notes = lost_notes(vms, lost)
        if notes:
            await self._hosts.note_placed(notes)
        if all(vm.host is not None for vm in vms):
            return 0
        # A span of its own: the Scheduled events it stores carry its trace id, as every event does.
        with TRACER.start_as_current_span("schedule") as span:
            decided = place(vms, hosts, now)
            placed = await self._hosts.place(decided.assignments, decided.unschedulable)
            span.set_attribute("tofu_qemu.vms_placed", len(placed))
            span.set_attribute("tofu_qemu.vms_unschedulable", len(decided.unschedulable))
        for uid, reason in decided.unschedulable.items():
            log.debug("vm_unschedulable", uid=uid, reason=reason)
        if placed:
            log.info("vms_scheduled", count=len(placed))
        return len(placed)
