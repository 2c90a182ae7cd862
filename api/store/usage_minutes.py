"""The usage store's fine series: per VM per UTC minute (`vm_usage_minutes`), what the VM page's
charts draw for the last hour (one bar a minute) and the last day (one bar per 15 minutes).

Invariants:
- Written only inside the sampler's round (`add_minutes` in UsageStore.record), so a minute's
  sums commit with the hourly sums and the cursors: the two series never disagree by a round.
- Kept usage_minutes_retention_hours, then deleted by the sampler's hourly prune.
- A read sums the minutes in SQL into at most `count` bars of `step` (every uid of the VM name
  together), so a chart reads as many rows as it draws, whatever the retention.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from api.store.db import Database
from api.store.sql import Transaction
from api.usage import MinuteUsage, SpanUsage, Usage

MINUTE = timedelta(minutes=1)
# The most bars one read returns: a day of 1-minute bars (a chart draws 60 or 96).
SPANS_MAX = 1440


def spans_window(now: datetime, step: timedelta, count: int) -> tuple[datetime, datetime]:
    """The `count` UTC-aligned periods of `step` ending with the one holding `now`: [first, end)."""
    seconds = int(step.total_seconds())
    epoch = int(now.timestamp())
    end = epoch - epoch % seconds + seconds
    return datetime.fromtimestamp(end - count * seconds, UTC), datetime.fromtimestamp(end, UTC)


async def add_minutes(conn: Transaction, minutes: Sequence[MinuteUsage]) -> None:
    """Add `minutes` to the sums, in the caller's transaction (the sampler's round)."""
    if not minutes:
        return
    await conn.executemany(
        "INSERT INTO vm_usage_minutes (uid, minute, project, vm_name, cpu_seconds, memory_mib_seconds,"
        " uptime_seconds) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (uid, minute) DO UPDATE SET"
        " cpu_seconds = vm_usage_minutes.cpu_seconds + excluded.cpu_seconds,"
        " memory_mib_seconds = vm_usage_minutes.memory_mib_seconds + excluded.memory_mib_seconds,"
        " uptime_seconds = vm_usage_minutes.uptime_seconds + excluded.uptime_seconds,"
        " vm_name = excluded.vm_name",
        [(m.uid, int(m.minute.timestamp()), m.project, m.vm_name, *_figures(m.usage)) for m in minutes],
    )


def _figures(usage: Usage) -> tuple[float, float, float]:
    return usage.cpu_seconds, usage.memory_mib_seconds, usage.uptime_seconds


async def spans(
    db: Database, project: str, vm_name: str, now: datetime, *, step: timedelta, count: int
) -> list[SpanUsage]:
    """The VM name's usage in the `count` periods of `step` up to the one holding `now` (see
    `spans_window`), oldest first; a period without minutes is left out.

    :raise ValueError: `step` is not a whole number of minutes, or `count` is past SPANS_MAX.
    """
    seconds = int(step.total_seconds())
    if seconds <= 0 or seconds % 60 or step.microseconds or not 0 < count <= SPANS_MAX:
        raise ValueError(f"{count} spans of {step} is not a chart's whole minutes")
    first, end = spans_window(now, step, count)
    rows = await db.read(
        "SELECT minute - minute % ? AS span, SUM(cpu_seconds), SUM(memory_mib_seconds),"
        " SUM(uptime_seconds) FROM vm_usage_minutes"
        " WHERE project = ? AND vm_name = ? AND minute >= ? AND minute < ?"
        " GROUP BY span ORDER BY span LIMIT ?",
        (seconds, project, vm_name, int(first.timestamp()), int(end.timestamp()), count),
    )
    return [
        SpanUsage(
            datetime.fromtimestamp(int(row[0]), UTC), step, Usage(float(row[1]), float(row[2]), float(row[3]))
        )
        for row in rows
    ]


async def prune_minutes(db: Database, before: datetime) -> int:
    """Delete the minutes that started before `before`; returns how many."""
    epoch = int(before.timestamp())
    async with db.write(durable=False, notify=False) as conn:
        return await conn.execute("DELETE FROM vm_usage_minutes WHERE minute < ?", (epoch - epoch % 60,))
