"""The overview's read of every project's recent usage hours (api/store/usage_recent.py), on
SQLite and PostgreSQL: from the hour holding `since` on, per VM oldest first, bounded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from api.store import Database, usage_recent
from api.store.usage import TooManyRows, UsageStore
from api.usage import HourUsage, Usage

HOUR = datetime(2026, 12, 3, 13, 0, tzinfo=UTC)


def row(uid: str, project: str, hour: datetime, cpu: float) -> HourUsage:
    return HourUsage(uid, project, "web", hour, Usage(cpu, cpu * 10, 60), disk_bytes=int(cpu))


async def test_every_project_from_the_hour_of_since_on(db: Database) -> None:
    rows = [
        row("u1", "lab", HOUR - timedelta(hours=1), 1.0),  # before the hour of `since`
        row("u1", "lab", HOUR, 2.0),
        row("u1", "lab", HOUR + timedelta(hours=1), 3.0),
        row("u2", "prod", HOUR, 4.0),
    ]
    await UsageStore(db).record(rows, {})
    since = HOUR + timedelta(minutes=59)
    found = await usage_recent.recent_hours(db, since.astimezone(UTC))
    assert found == rows[1:]


async def test_more_rows_than_the_bound_are_refused(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    await UsageStore(db).record([row("u1", "lab", HOUR, 1.0), row("u2", "lab", HOUR, 1.0)], {})
    monkeypatch.setattr(usage_recent, "ROWS_MAX", 1)
    with pytest.raises(TooManyRows):
        await usage_recent.recent_hours(db, HOUR)
    monkeypatch.setattr(usage_recent, "ROWS_MAX", 2)
    assert len(await usage_recent.recent_hours(db, HOUR)) == 2
