"""The usage hours of every project since a time: what the dashboard's overview reads to say
which VMs use the most now (api/overview.py). Bounded like every usage read (ROWS_MAX)."""

from __future__ import annotations

from datetime import UTC, datetime

from api.store.db import Database
from api.store.usage import HOUR_COLUMNS, ROWS_MAX, TooManyRows, hour_of_row
from api.usage import HourUsage


async def recent_hours(db: Database, since: datetime) -> list[HourUsage]:
    """Every VM's hourly rows from the hour holding `since` on, per VM oldest first.

    :raise TooManyRows: more than ROWS_MAX of them.
    """
    first = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    rows = await db.read(
        f"SELECT {HOUR_COLUMNS} FROM vm_usage WHERE hour >= ? ORDER BY uid, hour LIMIT ?",  # noqa: S608
        (first.isoformat(), ROWS_MAX + 1),
    )
    if len(rows) > ROWS_MAX:
        raise TooManyRows(f"more than {ROWS_MAX} hourly rows since {first.isoformat()}")
    return [hour_of_row(row) for row in rows]
