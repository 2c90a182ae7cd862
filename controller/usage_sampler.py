"""The usage sampler: every `usage_sample_seconds`, one look at each running VM's QEMU from the
host, its usage since the last look stored per hour (and per minute, for a shorter time) and
exported as metrics (docs/usage.md).

What it reads, per VM: `/proc/<pid>/stat` once (utime + stime, RSS, the start time that makes
the process's identity), with the resync's reader (process.stat_fields), and `st_blocks` of the
VM's disk files. The rest of a round is arithmetic per VM, kept to plain tuples and floats: at
hundreds of VMs a round's cost is its per-VM Python, not its reads (docs/controller.md).

The math is controller/metering.py's; the store's round is one transaction with the cursors
(api/store/usage.py), so a restarted controller resumes exactly where the last commit ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from api.store.sql import FAILURES
from api.store.usage import UsageStore, VMIdentity
from api.usage import Cursor, HourUsage, MinuteUsage, Usage
from controller.metering import ProcessSample, split_by_hour, split_by_minute, usage_since
from controller.qemu import process

log = structlog.get_logger(__name__)
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
PRUNE_PERIOD_SECONDS = 3600.0
LABELS = ("project", "vm", "uid")
# The host the VM runs on (docs/multi-host.md), after the VM's labels on every tofu_qemu_vm_*.
HOST_LABEL = "host"


def boot_time() -> float:
    """When the host booted (epoch seconds), from /proc/stat's btime."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("/proc/stat has no btime line")


def read_process(pid: int, *, booted_at: float, at: float) -> ProcessSample | None:
    """`pid`'s counters from /proc/<pid>/stat; None when it is gone (or a zombie)."""
    fields = process.stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    start_ticks = int(fields[19])
    return ProcessSample(
        pid=pid,
        start_ticks=start_ticks,
        started_at=booted_at + start_ticks / TICKS_PER_SECOND,
        cpu_ticks=int(fields[11]) + int(fields[12]),
        rss_bytes=int(fields[21]) * PAGE_BYTES,
        at=at,
    )


def allocated_bytes(paths: Iterable[str]) -> int:
    """Bytes the filesystem allocated to `paths` (st_blocks), the missing ones as 0."""
    total = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(path).st_blocks * 512
    return total


class UsageMetrics:
    """tofu_qemu_vm_*: one series per running VM; a VM's series go when it stops running.

    `host`: this controller's host, as the label `host` (empty, which Prometheus reads as no
    label, where no host is given: unit tests).
    """

    def __init__(self, registry: CollectorRegistry, *, host: str = "") -> None:
        self._host = host
        labels = (*LABELS, HOST_LABEL)
        self.cpu_seconds = Counter(
            "tofu_qemu_vm_cpu_seconds", "CPU time of the VM's QEMU, all threads", labels, registry=registry
        )
        self.memory_mib_seconds = Counter(
            "tofu_qemu_vm_memory_mib_seconds",
            "Resident memory of the VM's QEMU integrated over time (MiB x seconds)",
            labels,
            registry=registry,
        )
        self.uptime_seconds = Counter(
            "tofu_qemu_vm_uptime_seconds", "Time the VM's QEMU process existed", labels, registry=registry
        )
        self.disk_bytes = Gauge(
            "tofu_qemu_vm_disk_bytes", "Bytes allocated by the VM's disk files", labels, registry=registry
        )
        # Each VM's four series, looked up once: `labels()` costs more than the update itself.
        self._series: dict[tuple[str, str, str], tuple[Counter, Counter, Counter, Gauge]] = {}

    def add(self, labels: tuple[str, str, str], usage: Usage, disk_bytes: int) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = (
                self.cpu_seconds.labels(*labels, self._host),
                self.memory_mib_seconds.labels(*labels, self._host),
                self.uptime_seconds.labels(*labels, self._host),
                self.disk_bytes.labels(*labels, self._host),
            )
        cpu, memory, uptime, disk = series
        cpu.inc(usage.cpu_seconds)
        memory.inc(usage.memory_mib_seconds)
        uptime.inc(usage.uptime_seconds)
        disk.set(disk_bytes)

    def keep_only(self, labels: set[tuple[str, str, str]]) -> None:
        for gone in self._series.keys() - labels:
            for metric in (self.cpu_seconds, self.memory_mib_seconds, self.uptime_seconds, self.disk_bytes):
                metric.remove(*gone, self._host)
            del self._series[gone]


@dataclass(frozen=True, slots=True)
class _Look:
    """One round's reading: each sampled VM's process and disk bytes, and the cursors whose
    process is gone."""

    samples: dict[str, tuple[ProcessSample, int]]
    gone: set[str]


class UsageSampler:
    def __init__(
        self,
        store: UsageStore,
        running: Callable[[], Mapping[str, int]],
        metrics: UsageMetrics,
        *,
        period: float,
        retention: timedelta,
        minutes_retention: timedelta,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """`running()`: the pid of each VM's watched QEMU, by uid (Runtime's attachments).
        `retention` is the hourly sums', `minutes_retention` the per-minute series'."""
        self._store = store
        self._running = running
        self._metrics = metrics
        self.period = period
        self.retention = retention
        self.minutes_retention = minutes_retention
        self._wall = wall
        self._cursors: dict[str, Cursor] | None = None
        self._pruned_at = float("-inf")

    async def run(self) -> None:
        """Sample every period until cancelled; prune the hours and minutes past their retention
        every hour.
        A failed round raises (keep_running retries it, from the cursors in the store)."""
        self._cursors = None
        while True:
            await self.sample_once()
            await self._prune_when_due()
            await asyncio.sleep(self.period)

    async def sample_once(self) -> None:
        """One round: read every running VM, store its usage since its cursor with the new cursors.

        :raise StorageFull, StoreUnavailable, sql.DatabaseError, OSError: nothing was counted;
            the next round counts it from the same cursors.
        """
        if self._cursors is None:
            self._cursors = await self._store.cursors()
        pids = dict(self._running())
        identities = await self._store.identities(pids) if pids else {}
        look = await asyncio.to_thread(self._look, pids, identities, dict(self._cursors))
        hours: list[HourUsage] = []
        minutes: list[MinuteUsage] = []
        cursors: dict[str, Cursor] = {}
        added: dict[tuple[str, str, str], tuple[Usage, int]] = {}
        for uid, (sample, disk_bytes) in look.samples.items():
            identity = identities[uid]
            interval = usage_since(
                self._cursors.get(uid),
                sample,
                ticks_per_second=TICKS_PER_SECOND,
                backfill_limit=self.retention.total_seconds(),
            )
            hours += [
                HourUsage(uid, identity.project, identity.name, hour, usage, disk_bytes)
                for hour, usage in split_by_hour(interval)
            ]
            minutes += [
                MinuteUsage(uid, identity.project, identity.name, minute, usage)
                for minute, usage in split_by_minute(
                    interval, not_before=sample.at - self.minutes_retention.total_seconds()
                )
            ]
            cursors[uid] = sample.cursor()
            added[(identity.project, identity.name, uid)] = (interval.usage, disk_bytes)
        if hours or cursors or look.gone:  # an idle host writes nothing
            await self._store.record(hours, cursors, look.gone, minutes)
        for uid in look.gone:
            self._cursors.pop(uid, None)
        self._cursors.update(cursors)
        for labels, (usage, disk_bytes) in added.items():
            self._metrics.add(labels, usage, disk_bytes)
        self._metrics.keep_only(set(added))

    def _look(
        self, pids: Mapping[str, int], identities: Mapping[str, VMIdentity], cursors: Mapping[str, Cursor]
    ) -> _Look:
        """Read /proc and the disks (blocking: run in a thread)."""
        at, booted_at = self._wall(), boot_time()
        samples: dict[str, tuple[ProcessSample, int]] = {}
        for uid, pid in pids.items():
            identity = identities.get(uid)
            sample = read_process(pid, booted_at=booted_at, at=at) if identity is not None else None
            if identity is not None and sample is not None:
                samples[uid] = (sample, allocated_bytes(identity.disk_paths))
        # A cursor stays while its process lives, watched or not yet (a controller that just
        # started attaches its VMs over its first reconciles): only a gone process ends it.
        gone = set()
        for uid, cursor in cursors.items():
            if uid in samples:
                continue
            current = read_process(cursor.pid, booted_at=booted_at, at=at)
            if current is None or not current.continues(cursor):
                gone.add(uid)
        return _Look(samples, gone)

    async def _prune_when_due(self) -> None:
        now = self._wall()
        if now - self._pruned_at < PRUNE_PERIOD_SECONDS:
            return
        self._pruned_at = now
        at = datetime.fromtimestamp(now, UTC)
        try:
            deleted = await self._store.prune(at - self.retention)
            deleted += await self._store.prune_minutes(at - self.minutes_retention)
        except FAILURES as err:
            log.warning("usage_prune_failed", error=str(err))
            return
        if deleted:
            log.info("usage_pruned", deleted=deleted)
