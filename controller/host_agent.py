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
import math
import os
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import structlog
from prometheus_client import CollectorRegistry, Gauge

from api.hosts import Host, Resources
from api.store import Database
from api.store.fencing import FencedDatabase
from api.store.hosts import Hosts, Leases, Registration
from api.store.lease_renewal import lease_renewal
from api.store.records import EventType
from api.store.sql import Dialect
from controller import host_memory
from controller.fencing import fence_deadline, fence_margin, must_fence, rescheduled, strays
from controller.loop_stalls import stall_tolerant_timeout
from controller.placement import lost_hosts, lost_notes, place
from controller.self_fence import HostQemus
from controller.settings import ControllerSettings
from controller.sources import TRANSIENT_ERRORS
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
    """The host's registration, its lease, and the fence (docs/multi-host.md, "Fencing").

    `store` is the controller's store for every host-side write: refused once the host's epoch
    moved on. `may_spawn()` says whether a QEMU may start now: not once the lease may have run
    out (a fence is due, counted on the monotonic clock, so a controller waking from a freeze
    knows at once), nor while the epoch is stale or being checked.
    """

    def __init__(
        self,
        settings: ControllerSettings,
        db: Database,
        metrics: HostMetrics,
        *,
        qemus: HostQemus | None = None,
        wake: Callable[[str], None] = lambda _uid: None,
    ) -> None:
        self.name = settings.resolved_host_name
        self._registration = Registration(
            name=self.name,
            labels=settings.labels,
            capacity=host_capacity(settings),
            lease_seconds=settings.host_lease_seconds,
        )
        self._hosts = Hosts(db)
        # On PostgreSQL a connection of its own: a renewal never queues behind other writes.
        self._renewal = lease_renewal(db)
        self._db = db
        self._metrics = metrics
        self._qemus = qemus
        self._wake = wake
        self._stale = asyncio.Event()
        self.store = FencedDatabase(db, self.name, on_stale=self._stale.set)
        self._fenced_events = Hosts(self.store)
        # Monotonic time at which the last successful renewal (or registration) was sent.
        self._renewal_sent_at = -math.inf
        # True from a self-fence until the next renewal; the uids a fence killed, told in
        # Fenced events once the store takes this host's writes again.
        self._self_fenced = False
        self._fenced_uids: list[str] = []
        # Set at every successful renewal: what the fence waits for before it kills.
        self._renewed = asyncio.Event()
        # One renewal or recovery at a time; no QEMU starts while a recovery runs.
        self._checking = asyncio.Lock()
        self._recovering = False

    @property
    def lease_seconds(self) -> float:
        return self._registration.lease_seconds

    def may_spawn(self) -> bool:
        return not (self._stale.is_set() or self._recovering or self._fence_due())

    async def register(self) -> Host:
        """Register the host; the only host also adopts what was stored before hosts existed."""
        host = await self._take_epoch()
        if self._db.dialect is Dialect.SQLITE:
            renamed = await self._hosts.take_over_renamed(self.name)
            if renamed:
                log.warning("host_renamed", host=self.name, previously=renamed)
        if await self._hosts.adopt_legacy(self.name):
            log.debug("host_adopted_legacy_rows", host=self.name)
        log.info("host_registered", host=self.name, epoch=host.epoch, capacity=host.capacity.to_json())
        return host

    async def _take_epoch(self) -> Host:
        """Register again: a fresh lease and the next epoch, which this controller's writes carry."""
        sent = time.monotonic()
        host = await self._hosts.register(self._registration)
        self.store.epoch = host.epoch
        self._renewal_sent_at = sent
        self._stale.clear()
        return host

    async def renew_forever(self) -> None:
        """Renew the lease every host_lease_seconds / 3 (see `renew`). A renewal is given the
        whole lease: one cut short would only fail sooner; the fence does not wait for it."""
        period = self.lease_seconds / RENEWALS_PER_LEASE
        next_at = time.monotonic() + period
        try:
            while True:
                await asyncio.sleep(max(next_at - time.monotonic(), 0.0))
                # Counted from this send, not from the end of a slow renewal: sends stay lease/3 apart.
                next_at = time.monotonic() + period
                await self.renew(within=self.lease_seconds)
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    self._metrics.update(await self._hosts.all(), await self._db.database_now())
        finally:
            await self.close()

    async def close(self) -> None:
        """Let go of the renewal's own connection (PostgreSQL)."""
        await self._renewal.close()

    async def renew(self, *, within: float) -> bool:
        """Renew the lease at this controller's epoch, within `within` seconds. Returns whether it
        runs. A stale epoch (or a host row gone) is recovered from (`_recover`) before returning."""
        async with self._checking:
            sent = time.monotonic()
            try:
                # The database's answer decides, not a deadline a frozen or starved loop served late.
                async with stall_tolerant_timeout(within):
                    renewed = await self._renewal.renew(self.name, self.store.epoch or 0)
                    if not renewed:
                        await self._recover()
            except (TimeoutError, *TRANSIENT_ERRORS) as err:
                log.warning("host_lease_not_renewed", host=self.name, error=f"{type(err).__name__}: {err}")
                return False
            finally:
                self._recovering = False
            if renewed:
                self._renewal_sent_at = sent
            self._renewed.set()
        if self._self_fenced:
            self._self_fenced = False
            log.warning("host_unfenced", host=self.name)
            await self._tell_fenced("its host could not renew its lease")
        return True

    async def fence_forever(self) -> None:
        """Fence when due: at once when a write finds the epoch stale (`renew` recovers); and
        when the lease may run out before another renewal (FENCE_MARGIN_FRACTION of it before
        its end): a last wait of half the margin for a renewal (`renew_forever`'s, in flight or
        due), then SIGKILL of every QEMU of this host. A controller waking from a freeze lands
        here (or in `renew_forever`) first: its renewal checks its epoch."""
        period = self.lease_seconds / RENEWALS_PER_LEASE
        while True:
            due = fence_deadline(self._renewal_sent_at, self.lease_seconds) - time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(due, 0.0)):
                    await self._stale.wait()
            if self._stale.is_set():
                if not await self.renew(within=self.lease_seconds):
                    await asyncio.sleep(period)
            elif self._fence_due() and not self._self_fenced:
                await self._last_renewal()
                if self._fence_due():
                    await self._self_fence()
            elif self._self_fenced:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(period):
                        await self._stale.wait()

    async def _last_renewal(self) -> None:
        """Before a fence: wait for the renewal in flight, or make one, for `_last_wait()`."""
        within = self._last_wait()
        if not self._checking.locked():
            await self.renew(within=within)
            return
        self._renewed.clear()
        with contextlib.suppress(TimeoutError):
            async with stall_tolerant_timeout(within):
                await self._renewed.wait()

    def _last_wait(self) -> float:
        """How long a due fence waits for a renewal: half the margin, so that the kill comes
        before the lease ends; but a whole renewal period once the lease has run out already (a
        freeze, a stalled loop): then the epoch check comes first, and kills only what moved."""
        if time.monotonic() >= self._renewal_sent_at + self.lease_seconds:
            return self.lease_seconds / RENEWALS_PER_LEASE
        return fence_margin(self.lease_seconds) / 2

    def _fence_due(self) -> bool:
        """On SQLite never: one machine holds the store, so no other host can take its VMs, and
        a controller starved of CPU would only kill them for nothing."""
        if self._db.dialect is Dialect.SQLITE:
            return False
        return must_fence(time.monotonic(), self._renewal_sent_at, self.lease_seconds)

    async def _self_fence(self) -> None:
        """The lease cannot be renewed: kill every QEMU here before another host may start them."""
        self._self_fenced = True
        killed = self._kill(self._running())
        log.error("host_self_fenced", host=self.name, killed=len(killed))
        if self._qemus is not None:
            await self._qemus.wait_gone(killed)

    async def _recover(self) -> None:
        """The host's epoch moved on (its VMs were moved away, or it registered again): register
        again, then kill the QEMUs of the VMs no longer placed here, before anything else starts
        (`may_spawn` is False until the caller lets go of the check)."""
        self._recovering = True
        stale = self.store.epoch
        host = await self._take_epoch()
        log.warning("host_epoch_stale", host=self.name, epoch=stale, registered_at_epoch=host.epoch)
        mine = await self._hosts.placed_on(self.name)
        running = self._running()
        killed = self._kill(strays(running, mine))
        if self._qemus is not None:
            await self._qemus.wait_gone(killed)
        await self._tell_fenced(f"the VM was moved away from host {self.name}")
        for uid in {*running, *mine}:
            self._wake(uid)

    def _running(self) -> list[str]:
        return self._qemus.running() if self._qemus is not None else []

    def _kill(self, uids: list[str]) -> list[str]:
        killed = self._qemus.kill(uids) if self._qemus is not None else []
        self._fenced_uids.extend(uid for uid in killed if uid not in self._fenced_uids)
        return killed

    async def _tell_fenced(self, why: str) -> None:
        """Fenced events for the QEMUs killed, now that the store takes this host's writes, and
        a reconcile of each (restarted if still placed here, released if not)."""
        uids, self._fenced_uids = self._fenced_uids, []
        try:
            await self._fenced_events.record(
                {uid: f"QEMU on host {self.name} killed: {why}" for uid in uids}, "Fenced", EventType.WARNING
            )
        except TRANSIENT_ERRORS as err:
            log.warning("fenced_events_not_recorded", error=f"{type(err).__name__}: {err}", uids=uids)
        for uid in uids:
            self._wake(uid)


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
        # What the last pass that changed nothing read (placement_version and the hosts): while
        # VMs wait for room that no host has, passes at every state write would otherwise read
        # and decode every VM again to find the same.
        self._settled: tuple[object, ...] | None = None

    async def run_forever(self) -> None:
        """A pass at every commit of this process, at other processes' commits (polled), and
        at least every lease / 3, which also renews the lease."""
        changed = asyncio.Event()
        # Status and event writes (most commits) neither add a VM nor free room: not woken by them.
        self._db.subscribe(changed.set, volatile=False)
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
            elif not leader:
                # A follower has nothing to do with commits. Left set, the event would make the
                # wait below return at once, without yielding: the loop spun and starved every
                # other task of this controller until the next lease try (lease / 3).
                changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(SCHEDULER_POLL_SECONDS, renew_every)):
                    await changed.wait()

    async def _take_lease(self, was_leader: bool) -> bool:
        leader = await self._leases.hold(SCHEDULER_LEASE, self._holder, self._lease_seconds)
        if leader != was_leader:
            log.info("scheduler_lease", holder=self._holder, held=leader)
        return leader

    async def schedule_once(self, *, look_for_lost: bool = True) -> int:
        """One placement pass over every live VM; returns how many were placed or moved. VMs of
        a host lost for host_lost_grace_seconds get HostReady=False, and those that hold no data
        are rescheduled to another host (controller/fencing.py); without `look_for_lost`, only
        when some VM waits for a host or a note."""
        if not look_for_lost and not await self._hosts.anything_to_schedule():
            return 0
        hosts = await self._hosts.all()
        now = await self._db.database_now()
        lost = lost_hosts(hosts, now, self._lost_grace)
        if look_for_lost and not lost and not await self._hosts.anything_to_schedule():
            return 0  # every VM placed on a live host, no note to clear: nothing to read
        seen = (await self._hosts.placement_version(), _placement_view(hosts, now))
        if not lost and seen == self._settled:
            return 0  # the waiting VMs and the hosts are as the last pass left them
        self._settled = None
        vms = await self._hosts.placed()
        notes = lost_notes(vms, lost)
        if notes:
            await self._hosts.note_placed(notes)
        moving = {vm.uid: vm.host for vm in rescheduled(vms, lost) if vm.host is not None}
        if not moving and all(vm.host is not None for vm in vms):
            return 0
        # A span of its own: the Scheduled events it stores carry its trace id, as every event does.
        with TRACER.start_as_current_span("schedule") as span:
            decided = place([replace(vm, host=None) if vm.uid in moving else vm for vm in vms], hosts, now)
            fresh = {uid: host for uid, host in decided.assignments.items() if uid not in moving}
            placed = await self._hosts.place(
                fresh, {u: r for u, r in decided.unschedulable.items() if u not in moving}
            )
            moves = {uid: (moving[uid], host) for uid, host in decided.assignments.items() if uid in moving}
            moved = await self._hosts.reschedule(moves, lost)
            span.set_attribute("tofu_qemu.vms_placed", len(placed))
            span.set_attribute("tofu_qemu.vms_rescheduled", len(moved))
            span.set_attribute("tofu_qemu.vms_unschedulable", len(decided.unschedulable))
        for uid, reason in decided.unschedulable.items():
            log.debug("vm_unschedulable", uid=uid, reason=reason, waits_on_lost_host=uid in moving)
        if placed:
            log.info("vms_scheduled", count=len(placed))
        if moved:
            log.warning("vms_rescheduled", count=len(moved), lost=sorted({moving[uid] for uid in moved}))
        if not (placed or moved or notes):
            # Its own Scheduled=False notes, if it wrote new ones, move the version: the next
            # pass then runs once more, writes nothing, and settles.
            self._settled = seen
        return len(placed) + len(moved)


def _placement_view(hosts: list[Host], now: datetime) -> tuple[object, ...]:
    """The hosts as placement sees them: all but the lease renewal's time, and whether each is
    ready (a renewal alone changes nothing a pass decides)."""
    return tuple((replace(host, lease_renewed_at=_UNSEEN), host.ready(now)) for host in hosts)


_UNSEEN = datetime(1970, 1, 1, tzinfo=UTC)
