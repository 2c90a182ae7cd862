"""The usage store and the sampler against a real store (SQLite and PostgreSQL) and real processes
from /proc: sums that only grow, cursors committed with them, exact counting across a process
restart and a controller restart, retention, and the metrics' series."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from api.store import Database, StateStore, StoreUnavailable, VMStore, open_store
from api.store.usage import TooManyRows, UsageStore
from api.store.usage_minutes import MINUTE, spans
from api.testing.tfstate import vm_state
from api.testing.waiting import wait_until_async
from api.usage import Cursor, HourUsage, MinuteUsage, Usage
from controller.usage_sampler import (
    PRUNE_PERIOD_SECONDS,
    TICKS_PER_SECOND,
    UsageMetrics,
    UsageSampler,
    read_process,
)
from tests.component.conftest import FakeClock
from tests.component.test_store_states import write

HOUR = datetime(2026, 12, 3, 13, tzinfo=UTC)
MINUTES_RETENTION = timedelta(hours=48)
# A busy loop that stops counting CPU when it gets SIGUSR1 (it sleeps from then on).
SPINNER = (
    "import signal, time\n"
    "busy = [True]\n"
    "signal.signal(signal.SIGUSR1, lambda *_: busy.__setitem__(0, False))\n"
    "while busy[0]: pass\n"
    "while True: time.sleep(60)\n"
)


def row(uid: str, hour: datetime, cpu: float, *, name: str = "web", disk: int = 4096) -> HourUsage:
    return HourUsage(uid, "lab", name, hour, Usage(cpu, cpu * 100, 60), disk)


async def test_record_adds_to_the_hour_and_keeps_the_latest_disk_bytes(db: Database) -> None:
    usage = UsageStore(db)
    await usage.record([row("u1", HOUR, 1.5, disk=100)], {})
    await usage.record([row("u1", HOUR, 2.0, disk=300), row("u1", HOUR + timedelta(hours=1), 4.0)], {})
    first, second = await usage.hours("lab", HOUR, HOUR + timedelta(hours=2))
    assert (first.usage, first.disk_bytes) == (Usage(3.5, 350, 120), 300)
    assert (second.hour, second.usage.cpu_seconds) == (HOUR + timedelta(hours=1), 4.0)


async def test_cursors_are_set_replaced_and_forgotten_with_the_sums(db: Database) -> None:
    usage = UsageStore(db)
    await usage.record([], {"u1": Cursor(10, 1000, 50, 4096, 1.5e9), "u2": Cursor(11, 1001, 0, 0, 1.5e9)})
    await usage.record([row("u1", HOUR, 1)], {"u1": Cursor(10, 1000, 150, 8192, 1.5e9 + 15)}, forget=["u2"])
    assert await usage.cursors() == {"u1": Cursor(10, 1000, 150, 8192, 1.5e9 + 15)}


async def test_the_range_takes_the_hours_it_overlaps_in_any_offset(db: Database) -> None:
    """An hour is in the range when it ends after `from` and starts before `to`; times with an
    offset compare as the same instants in UTC."""
    usage = UsageStore(db)
    await usage.record([row("u1", HOUR + timedelta(hours=n), n) for n in range(4)], {})
    east = timezone(timedelta(hours=2))
    start = (HOUR + timedelta(hours=1, minutes=30)).astimezone(east)
    hours = await usage.hours("lab", start, (HOUR + timedelta(hours=2, minutes=1)).astimezone(east))
    assert [r.usage.cpu_seconds for r in hours] == [1, 2]
    assert await usage.hours("other", HOUR, HOUR + timedelta(hours=4)) == []


async def test_a_range_past_the_row_bound_is_refused(db: Database) -> None:
    """docs/usage.md: at most 10 000 hourly rows per answer."""
    usage = UsageStore(db)
    await usage.record([row(f"u{n}", HOUR, 1) for n in range(10_000)], {})
    assert len(await usage.hours("lab", HOUR, HOUR + timedelta(hours=1))) == 10_000
    await usage.record([row("one-more", HOUR, 1)], {})
    with pytest.raises(TooManyRows, match="more than 10000 hourly rows"):
        await usage.hours("lab", HOUR, HOUR + timedelta(hours=1))
    assert len(await usage.hours("lab", HOUR - timedelta(hours=1), HOUR)) == 0


async def test_prune_removes_only_hours_before_the_cutoff(db: Database) -> None:
    usage = UsageStore(db)
    await usage.record([row("u1", HOUR - timedelta(days=401), 1), row("u1", HOUR, 2)], {})
    assert await usage.prune(HOUR - timedelta(days=400)) == 1
    assert [
        r.usage.cpu_seconds
        for r in await usage.hours("lab", HOUR - timedelta(days=400), HOUR + timedelta(hours=1))
    ] == [2]


async def test_identities_name_the_vm_and_its_disks(db: Database, vms: VMStore, states: StateStore) -> None:
    await write(states, vm_state(1, {"web": {}}))
    (record,) = await vms.list_records(project="lab")
    identities = await UsageStore(db).identities([record.uid, "unknown"])
    assert {uid: (i.project, i.name, i.disk_paths) for uid, i in identities.items()} == {
        record.uid: ("lab", "web", ())
    }


@pytest.fixture
def spinner() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", SPINNER])
    yield process
    process.kill()
    process.wait()


def cpu_of(pid: int) -> float:
    sample = read_process(pid, booted_at=0, at=0)
    assert sample is not None
    return sample.cpu_ticks / TICKS_PER_SECOND


async def spin_for(pid: int, cpu_seconds: float) -> None:
    """Wait until `pid` has burned `cpu_seconds` more (a loaded host gives a spinner less than a
    core: wait for the CPU, not for the clock)."""
    start = cpu_of(pid)
    await wait_until_async(lambda: asyncio.sleep(0.05, cpu_of(pid)), lambda now: now - start >= cpu_seconds)


async def stop_spinning(spinner: asyncio.subprocess.Process | subprocess.Popen[bytes]) -> None:
    """Make the spinner sleep for good, and wait until it does (state S): its CPU count stays."""
    spinner.send_signal(signal.SIGUSR1)
    await wait_until_async(
        lambda: asyncio.sleep(
            0.05, Path(f"/proc/{spinner.pid}/stat").read_text().rpartition(")")[2].split()[0]
        ),
        lambda state: state == "S",
    )


async def test_the_sampler_counts_exactly_across_a_process_and_a_controller_restart(
    tmp_path: Path, clock: FakeClock, database_url: str | None, states: StateStore, vms: VMStore
) -> None:
    """Two processes in turn for one VM, and a sampler replaced by a new one on a reopened store
    between samples: the stored CPU equals what the kernel charged each process, to the tick."""
    await write(states, vm_state(1, {"web": {}}))
    (record,) = await vms.list_records(project="lab")
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"x" * 65536)
    running: dict[str, int] = {}
    registry = CollectorRegistry()
    metrics = UsageMetrics(registry, host="host-a")
    charged = 0.0
    for _ in range(2):  # a "QEMU restart": a second process for the same VM
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", SPINNER)
        try:
            running[record.uid] = process.pid
            for _ in range(2):  # a "controller restart" between two samples of this process
                db = await open_store(tmp_path / "data", database_url=database_url, clock=clock)
                sampler = UsageSampler(
                    UsageStore(db),
                    lambda: running,
                    metrics,
                    period=1,
                    retention=timedelta(days=400),
                    minutes_retention=MINUTES_RETENTION,
                )
                await add_disk(db, record.uid, disk)
                await spin_for(process.pid, 0.1)
                await sampler.sample_once()
                await db.close()
            await stop_spinning(process)
            charged += cpu_of(process.pid)
            db = await open_store(tmp_path / "data", database_url=database_url, clock=clock)
            await UsageSampler(
                UsageStore(db),
                lambda: running,
                metrics,
                period=1,
                retention=timedelta(days=1),
                minutes_retention=MINUTES_RETENTION,
            ).sample_once()
            await db.close()
        finally:
            process.kill()
            await process.wait()
    db = await open_store(tmp_path / "data", database_url=database_url, clock=clock)
    now = datetime.now(UTC)
    hours = await UsageStore(db).hours("lab", now - timedelta(hours=2), now + timedelta(hours=1))
    minutes = await spans(db, "lab", "web", now, step=MINUTE, count=120)
    await db.close()
    assert charged >= 0.4  # the spinners did burn CPU
    assert sum(h.usage.cpu_seconds for h in hours) == pytest.approx(charged, abs=0.011)
    # The minutes were written in the same rounds: they add up to the same total.
    assert sum(m.usage.cpu_seconds for m in minutes) == pytest.approx(charged, abs=0.011)
    assert hours[-1].disk_bytes >= 65536
    labels = {"project": "lab", "vm": "web", "uid": record.uid, "host": "host-a"}
    assert registry.get_sample_value("tofu_qemu_vm_disk_bytes", labels) == hours[-1].disk_bytes


async def add_disk(db: Database, uid: str, path: Path) -> None:
    async with db.write() as conn:
        await conn.execute(
            "INSERT INTO disks (uid, name, path, reclaim_policy, created_at)"
            " VALUES (?, 'root', ?, 'Delete', ?) ON CONFLICT (host, uid, name) DO NOTHING",
            (uid, str(path), HOUR.isoformat()),
        )


async def test_metrics_series_go_when_the_vm_stops_running(
    db: Database, states: StateStore, vms: VMStore, spinner: subprocess.Popen[bytes]
) -> None:
    await write(states, vm_state(1, {"web": {}}))
    (record,) = await vms.list_records(project="lab")
    running = {record.uid: spinner.pid}
    registry = CollectorRegistry()
    sampler = UsageSampler(
        UsageStore(db),
        lambda: running,
        UsageMetrics(registry, host="host-a"),
        period=1,
        retention=timedelta(days=1),
        minutes_retention=MINUTES_RETENTION,
    )
    await spin_for(spinner.pid, 0.05)
    await sampler.sample_once()
    labels = {"project": "lab", "vm": "web", "uid": record.uid, "host": "host-a"}
    assert (registry.get_sample_value("tofu_qemu_vm_cpu_seconds_total", labels) or 0) > 0
    assert (registry.get_sample_value("tofu_qemu_vm_uptime_seconds_total", labels) or 0) > 0
    assert (registry.get_sample_value("tofu_qemu_vm_memory_mib_seconds_total", labels) or 0) > 0
    running.clear()
    await sampler.sample_once()
    assert registry.get_sample_value("tofu_qemu_vm_cpu_seconds_total", labels) is None
    assert registry.get_sample_value("tofu_qemu_vm_disk_bytes", labels) is None
    # Its process lives on, unwatched: the cursor stays, so a later watch resumes from it.
    assert record.uid in await UsageStore(db).cursors()
    spinner.kill()
    spinner.wait()
    await sampler.sample_once()
    assert await UsageStore(db).cursors() == {}


async def test_a_vm_without_an_object_is_not_sampled_and_nothing_is_written(
    db: Database, spinner: subprocess.Popen[bytes]
) -> None:
    commits: list[None] = []
    db.subscribe(lambda: commits.append(None))
    sampler = UsageSampler(
        UsageStore(db),
        lambda: {"gone": spinner.pid},
        UsageMetrics(CollectorRegistry()),
        period=1,
        retention=timedelta(days=1),
        minutes_retention=MINUTES_RETENTION,
    )
    await sampler.sample_once()
    assert await UsageStore(db).cursors() == {}
    assert os.path.exists(f"/proc/{spinner.pid}")
    assert commits == []


async def test_the_sampler_prunes_past_retention_at_start_and_then_hourly(db: Database) -> None:
    """The sampler is the table's one owner of retention: at its start, then every hour, of the
    hours and of the minutes, each past its own retention."""
    usage = UsageStore(db)
    now = [HOUR.timestamp()]
    sampler = UsageSampler(
        usage, dict, UsageMetrics(CollectorRegistry()), period=0.01, retention=timedelta(days=400),
        minutes_retention=MINUTES_RETENTION, wall=lambda: now[0],
    )  # fmt: skip
    old = HOUR - timedelta(days=401)
    old_minute, kept_minute = HOUR - MINUTES_RETENTION - MINUTE, HOUR - MINUTES_RETENTION
    minutes = [MinuteUsage("u1", "lab", "web", at, Usage(1, 1, 60)) for at in (old_minute, kept_minute)]
    await usage.record([row("u1", old, 1), row("u1", HOUR, 2)], {}, minutes=minutes)
    task = asyncio.create_task(sampler.run())
    try:
        await wait_until_async(
            lambda: usage.hours("lab", old, HOUR + timedelta(hours=1)), lambda rows: len(rows) == 1
        )
        # Hour-long bars from 49 hours back: the pruned minute's bar would be the first.
        left = await spans(db, "lab", "web", HOUR, step=timedelta(hours=1), count=50)
        assert [(m.start, m.usage.cpu_seconds) for m in left] == [(kept_minute, 1)]
        await usage.record([row("u1", old, 1)], {})
        now[0] += PRUNE_PERIOD_SECONDS - 1
        await asyncio.sleep(0.2)
        assert len(await usage.hours("lab", old, HOUR + timedelta(hours=1))) == 2
        now[0] += 1
        await wait_until_async(
            lambda: usage.hours("lab", old, HOUR + timedelta(hours=1)), lambda rows: len(rows) == 1
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert PRUNE_PERIOD_SECONDS == 3600


class FailingOnce(UsageStore):
    """A usage store whose next `record` fails as an unreachable database would."""

    fail = False

    async def record(self, *args: Any, **kwargs: Any) -> None:
        if self.fail:
            self.fail = False
            raise StoreUnavailable("the database did not answer")
        await super().record(*args, **kwargs)


async def test_a_failed_round_loses_nothing(
    db: Database, states: StateStore, vms: VMStore, spinner: subprocess.Popen[bytes]
) -> None:
    """The round whose write failed counts nothing (store and metrics); the next counts its
    interval from the same cursor, so the total still equals the kernel's."""
    await write(states, vm_state(1, {"web": {}}))
    (record,) = await vms.list_records(project="lab")
    store, registry = FailingOnce(db), CollectorRegistry()
    sampler = UsageSampler(
        store,
        lambda: {record.uid: spinner.pid},
        UsageMetrics(registry, host="host-a"),
        period=1,
        retention=timedelta(days=1),
        minutes_retention=MINUTES_RETENTION,
    )
    await sampler.sample_once()
    await spin_for(spinner.pid, 0.1)
    store.fail = True
    with pytest.raises(StoreUnavailable):
        await sampler.sample_once()
    labels = {"project": "lab", "vm": "web", "uid": record.uid, "host": "host-a"}
    await stop_spinning(spinner)
    await sampler.sample_once()
    now = datetime.now(UTC)
    hours = await store.hours("lab", now - timedelta(hours=2), now + timedelta(hours=1))
    assert sum(h.usage.cpu_seconds for h in hours) == pytest.approx(cpu_of(spinner.pid), abs=0.011)
    assert registry.get_sample_value("tofu_qemu_vm_cpu_seconds_total", labels) == pytest.approx(
        cpu_of(spinner.pid), abs=0.011
    )
