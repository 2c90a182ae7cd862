"""The usage store: per-VM per-hour sums (`vm_usage`), the sampler's cursors, and the writes of
the per-minute series (`vm_usage_minutes`, api/store/usage_minutes.py) that commit with them.

Invariants:
- A sampler's round is one transaction: the hours' increments and the cursors that end them
  commit together or not at all, so a crash (of the controller or the machine) can neither count
  an interval twice nor lose it: the next round starts from the cursor that was committed.
  That is why these writes need no fsync (`durable=False`, like events).
- Rows outlive their VM (they are keyed by uid and carry project and name); only retention
  (`prune`, run by the controller's sampler, the one owner) removes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from api.store.db import Database
from api.store.sql import JSON_STRINGS, Row
from api.store.usage_minutes import add_minutes, prune_minutes
from api.usage import Cursor, HourUsage, MinuteUsage, Usage

# The most hourly rows one query returns: ~1 year of one VM, or a week of 60.
ROWS_MAX = 10_000
HOUR_COLUMNS = "uid, hour, project, vm_name, cpu_seconds, memory_mib_seconds, uptime_seconds, disk_bytes"


@dataclass(frozen=True, slots=True)
class VMIdentity:
    """What the sampler needs of a VM besides its process: its names and its disk files."""

    project: str
    name: str
    disk_paths: tuple[str, ...]


class TooManyRows(Exception):
    """The range holds more hourly rows than ROWS_MAX."""


class UsageStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def identities(self, uids: Iterable[str]) -> dict[str, VMIdentity]:
        """Project, name and disk files of each of `uids` that has an object (two reads)."""
        wanted = json.dumps(sorted(uids))
        dialect = JSON_STRINGS[self._db.dialect]
        names = await self._db.read(
            f"SELECT uid, project, name FROM vms WHERE uid IN ({dialect})",  # noqa: S608
            (wanted,),
        )
        disks = await self._db.read(
            f"SELECT uid, path FROM disks WHERE uid IN ({dialect}) ORDER BY uid, name",  # noqa: S608
            (wanted,),
        )
        paths: dict[str, list[str]] = {}
        for uid, path in disks:
            paths.setdefault(uid, []).append(path)
        return {uid: VMIdentity(project, name, tuple(paths.get(uid, ()))) for uid, project, name in names}

    async def cursors(self) -> dict[str, Cursor]:
        rows = await self._db.read(
            "SELECT uid, pid, start_ticks, cpu_ticks, rss_bytes, sampled_at FROM vm_usage_cursors"
        )
        return {row[0]: Cursor(row[1], row[2], row[3], row[4], float(row[5])) for row in rows}

    async def record(
        self,
        hours: Sequence[HourUsage],
        cursors: Mapping[str, Cursor],
        forget: Iterable[str] = (),
        minutes: Sequence[MinuteUsage] = (),
    ) -> None:
        """Add `hours` and `minutes` to the sums, set `cursors` and drop those of `forget`, in
        one transaction.

        :raise StorageFull, StoreUnavailable, sql.DatabaseError: nothing was changed.
        """
        async with self._db.write(durable=False, notify=False) as conn:
            if hours:
                await conn.executemany(
                    "INSERT INTO vm_usage (uid, hour, project, vm_name, cpu_seconds, memory_mib_seconds,"
                    " uptime_seconds, disk_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (uid, hour) DO UPDATE SET"
                    " cpu_seconds = vm_usage.cpu_seconds + excluded.cpu_seconds,"
                    " memory_mib_seconds = vm_usage.memory_mib_seconds + excluded.memory_mib_seconds,"
                    " uptime_seconds = vm_usage.uptime_seconds + excluded.uptime_seconds,"
                    " disk_bytes = excluded.disk_bytes, vm_name = excluded.vm_name",
                    [_hour_row(row) for row in hours],
                )
            await add_minutes(conn, minutes)
            if cursors:
                await conn.executemany(
                    "INSERT INTO vm_usage_cursors (uid, pid, start_ticks, cpu_ticks, rss_bytes, sampled_at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (uid) DO UPDATE SET pid = excluded.pid,"
                    " start_ticks = excluded.start_ticks, cpu_ticks = excluded.cpu_ticks,"
                    " rss_bytes = excluded.rss_bytes, sampled_at = excluded.sampled_at",
                    [(uid, *_cursor_row(cursor)) for uid, cursor in cursors.items()],
                )
            gone = sorted(set(forget))
            if gone:
                await conn.execute(
                    f"DELETE FROM vm_usage_cursors WHERE uid IN ({JSON_STRINGS[self._db.dialect]})",  # noqa: S608
                    (json.dumps(gone),),
                )

    async def hours(
        self, project: str, start: datetime, end: datetime, *, vm_name: str | None = None
    ) -> list[HourUsage]:
        """The project's hourly rows overlapping [start, end), per VM oldest first; with
        `vm_name`, only those of the VMs of that name (every uid that had it).

        :raise TooManyRows: more than ROWS_MAX of them.
        """
        # Hours are stored as UTC text: compare with UTC text of the same shape.
        first = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        end = end.astimezone(UTC)
        where, params = (
            "project = ? AND hour >= ? AND hour < ?",
            [project, first.isoformat(), end.isoformat()],
        )
        if vm_name is not None:
            where, params = f"{where} AND vm_name = ?", [*params, vm_name]
        rows = await self._db.read(
            f"SELECT {HOUR_COLUMNS} FROM vm_usage WHERE {where} ORDER BY uid, hour LIMIT ?",  # noqa: S608
            (*params, ROWS_MAX + 1),
        )
        if len(rows) > ROWS_MAX:
            raise TooManyRows(f"the range holds more than {ROWS_MAX} hourly rows")
        return [hour_of_row(row) for row in rows]

    async def prune(self, before: datetime) -> int:
        """Delete the hours that started before `before`; returns how many."""
        cutoff = before.astimezone(UTC).replace(minute=0, second=0, microsecond=0).isoformat()
        async with self._db.write(durable=False, notify=False) as conn:
            return await conn.execute("DELETE FROM vm_usage WHERE hour < ?", (cutoff,))

    async def prune_minutes(self, before: datetime) -> int:
        """Delete the minutes of the fine series that started before `before`; returns how many."""
        return await prune_minutes(self._db, before)


def _cursor_row(cursor: Cursor) -> tuple[int, int, int, int, float]:
    # Field by field: dataclasses.astuple deep-copies each value, per VM and round.
    return cursor.pid, cursor.start_ticks, cursor.cpu_ticks, cursor.rss_bytes, cursor.at


def _hour_row(row: HourUsage) -> tuple[object, ...]:
    usage = row.usage
    return (
        row.uid,
        row.hour.isoformat(),
        row.project,
        row.vm_name,
        usage.cpu_seconds,
        usage.memory_mib_seconds,
        usage.uptime_seconds,
        row.disk_bytes,
    )


def hour_of_row(row: Row) -> HourUsage:
    """An hourly row read as HOUR_COLUMNS."""
    return HourUsage(
        uid=row[0],
        hour=datetime.fromisoformat(row[1]),
        project=row[2],
        vm_name=row[3],
        usage=Usage(float(row[4]), float(row[5]), float(row[6])),
        disk_bytes=int(row[7]),
    )
