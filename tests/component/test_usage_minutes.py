"""The per-minute usage series (api/store/usage_minutes.py) on SQLite and PostgreSQL: minutes
add up per uid, a chart's read sums them in SQL into UTC-aligned bars of every uid of the VM
name, reads at most the bars it asks for, and prune keeps what retention says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from api.store import Database
from api.store.usage import UsageStore
from api.store.usage_minutes import MINUTE, SPANS_MAX, spans, spans_window
from api.usage import MinuteUsage, SpanUsage, Usage

T0 = datetime(2026, 12, 3, 13, 0, tzinfo=UTC)
QUARTER = timedelta(minutes=15)


def minute(
    at: datetime, cpu: float, *, uid: str = "u1", name: str = "web", project: str = "lab"
) -> MinuteUsage:
    return MinuteUsage(uid, project, name, at, Usage(cpu, cpu * 100, 60))


async def test_minutes_add_up_per_uid_and_minute(db: Database) -> None:
    usage = UsageStore(db)
    await usage.record([], {}, minutes=[minute(T0, 1.5)])
    await usage.record([], {}, minutes=[minute(T0, 2.0), minute(T0 + MINUTE, 4.0)])
    assert await spans(db, "lab", "web", T0 + MINUTE, step=MINUTE, count=2) == [
        SpanUsage(T0, MINUTE, Usage(3.5, 350, 120)),
        SpanUsage(T0 + MINUTE, MINUTE, Usage(4.0, 400, 60)),
    ]


async def test_a_read_sums_the_minutes_into_aligned_bars_of_every_uid_of_the_name(db: Database) -> None:
    rows = [
        minute(T0 - MINUTE, 100),  # before the first bar of the window
        minute(T0, 1),
        minute(T0 + 14 * MINUTE, 2),
        minute(T0 + 14 * MINUTE, 4, uid="u2"),  # the VM re-created under the same name
        minute(T0 + 15 * MINUTE, 8),
        minute(T0 + 15 * MINUTE, 16, uid="u3", name="db"),  # another VM
        minute(T0 + 15 * MINUTE, 32, uid="u4", project="prod"),  # another project
        minute(T0 + 30 * MINUTE, 64),  # after the bar holding `now`
    ]
    await UsageStore(db).record([], {}, minutes=rows)
    now = T0 + 29 * MINUTE + timedelta(seconds=59)
    assert spans_window(now, QUARTER, 2) == (T0, T0 + 30 * MINUTE)
    found = await spans(db, "lab", "web", now, step=QUARTER, count=2)
    assert [(s.start, s.length, s.usage.cpu_seconds, s.usage.uptime_seconds) for s in found] == [
        (T0, QUARTER, 7.0, 180.0),
        (T0 + QUARTER, QUARTER, 8.0, 60.0),
    ]


async def test_a_read_returns_at_most_its_bars(db: Database) -> None:
    await UsageStore(db).record([], {}, minutes=[minute(T0 + n * MINUTE, 1) for n in range(120)])
    hour = await spans(db, "lab", "web", T0 + 119 * MINUTE, step=MINUTE, count=60)
    assert [s.start for s in hour] == [T0 + n * MINUTE for n in range(60, 120)]
    day = await spans(db, "lab", "web", T0 + 119 * MINUTE, step=QUARTER, count=96)
    assert [s.usage.cpu_seconds for s in day] == [15.0] * 8


@pytest.mark.parametrize(
    ("step", "count"),
    [(timedelta(seconds=90), 10), (timedelta(0), 10), (MINUTE, 0), (MINUTE, SPANS_MAX + 1)],
)
async def test_bars_that_are_not_whole_minutes_or_too_many_are_refused(
    db: Database, step: timedelta, count: int
) -> None:
    with pytest.raises(ValueError, match="whole minutes"):
        await spans(db, "lab", "web", T0, step=step, count=count)


async def test_prune_removes_only_minutes_before_the_cutoff(db: Database) -> None:
    usage = UsageStore(db)
    await usage.record([], {}, minutes=[minute(T0 - MINUTE, 1), minute(T0, 2), minute(T0 + MINUTE, 3)])
    assert await usage.prune_minutes(T0 + timedelta(seconds=30)) == 1
    left = await spans(db, "lab", "web", T0 + MINUTE, step=MINUTE, count=10)
    assert [s.start for s in left] == [T0, T0 + MINUTE]
    assert SPANS_MAX == 1440
