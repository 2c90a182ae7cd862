"""The per-VM event log: what happened to a VM and why, as Kubernetes Events (simplified).

Invariants:
- An event is written once and never updated; ids grow in commit order, so `after_id` pages a
  log forwards and a reader polling with its last id misses nothing.
- Events are found by (project, vm_name) as well as by uid, so a VM's history reads across its
  re-creations and survives its deletion until retention removes it.
- Events are history, not state: nothing reads them to decide anything. So they are written
  without fsync (`durable=False`, like status). A reconcile's events are inserted in the
  transaction of the status they came with (status_writer.py, `insert_events`): they exist
  exactly when it does. Events with no status to ride on (`record`: the API's) are the
  caller's to log and drop on failure, never a reason to fail what they describe.
- Retention (`prune`) keeps at most `per_vm_limit` events per (project, vm_name) and none older
  than `max_age`; project-level events (vm_name "") count as one more such log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from opentelemetry import trace

from api.infra.tracing import span_context_of
from api.store.db import Database, Transaction
from api.store.records import EventType as EventType
from api.store.records import NewEvent as NewEvent
from api.store.sql import FAILURES
from api.store.sql import Row as ResultRow

log = structlog.get_logger(__name__)
# A message is for people reading a table: QEMU's stderr or a long error is cut, and says so.
MESSAGE_MAX_BYTES = 1024
TRUNCATED = " …(truncated)"
LIST_LIMIT_MAX = 1000
PRUNE_PERIOD_SECONDS = 300.0
_COLUMNS = "id, uid, project, vm_name, time, type, reason, message, trace_id"


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    uid: str
    project: str
    vm_name: str
    time: datetime
    type: EventType
    reason: str
    message: str
    trace_id: str | None


Row = tuple[str, str, str, str, str, str, str, str | None]


@dataclass(slots=True)
class _Pending:
    rows: list[Row]
    # Settled once the rows are committed (None) or could not be (the error).
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class EventLog:
    """Records, lists and prunes events. One per process; it batches its own writes."""

    def __init__(
        self, db: Database, *, per_vm_limit: int = 200, max_age: timedelta = timedelta(days=7)
    ) -> None:
        """:raise ValueError: a limit below 1 or a non-positive age."""
        if per_vm_limit < 1 or max_age <= timedelta(0):
            raise ValueError("events need per_vm_limit >= 1 and a positive max_age")
        self._db = db
        self.per_vm_limit = per_vm_limit
        self.max_age = max_age
        self._pending: list[_Pending] = []
        self._flush_lock = asyncio.Lock()

    async def record(self, *events: NewEvent, conn: Transaction | None = None) -> None:
        """Store `events`, in order, with the current time and (unless given) trace id.

        With `conn`, inside the caller's write transaction: they commit or roll back with the
        change they describe. Without, they are group-committed: whoever flushes first writes
        every record pending at that moment in one transaction, so many reconciles recording
        at once cost a few transactions, not one each.

        :raise StorageFull: the data dir is full (nothing recorded).
        :raise StoreUnavailable, sql.DatabaseError: the store could not be written (busy, ...).
        """
        if not events:
            return
        if conn is not None:
            await insert_events(conn, events, now=self._db.clock())
            return
        now = self._db.clock().isoformat()
        rows = [_row(event, now) for event in events]
        mine = _Pending(rows)
        self._pending.append(mine)
        try:
            async with self._flush_lock:
                if not mine.done.done():
                    batch, self._pending = self._pending, []
                    await self._flush(batch)
        except asyncio.CancelledError:
            if mine in self._pending:
                self._pending.remove(mine)
            raise
        await mine.done

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            async with self._db.write(durable=False) as conn:
                await _insert(conn, [row for pending in batch for row in pending.rows])
        except asyncio.CancelledError:
            # Rolled back: the others' records go to whoever flushes next, ahead of newer ones.
            self._pending[:0] = [pending for pending in batch if not pending.done.done()]
            raise
        except Exception as err:
            for pending in batch:
                pending.done.set_exception(err)
            return
        for pending in batch:
            pending.done.set_result(None)

    async def list(
        self,
        *,
        project: str | None = None,
        vm_name: str | None = None,
        uid: str | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> list[EventRecord]:
        """Events matching every filter given, with id > `after_id`: the newest `limit` of them,
        oldest first (as `kubectl describe` shows them).

        :raise ValueError: `limit` outside 1..LIST_LIMIT_MAX.
        """
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise ValueError(f"limit must be between 1 and {LIST_LIMIT_MAX}")
        where: list[str] = ["id > ?"]
        params: list[object] = [after_id]
        for column, value in (("project", project), ("vm_name", vm_name), ("uid", uid)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        rows = await self._db.read(
            f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",  # noqa: S608
            (*params, limit),
        )
        return [_decode(row) for row in reversed(rows)]

    async def prune(self) -> int:
        """Delete events past `max_age`, then all but the newest `per_vm_limit` of each VM's.
        Returns how many rows were deleted.

        Cheap enough to run every few minutes: the age cut finds its boundary by walking ids
        from the oldest (ids grow with time, one host's clock), and the count cut looks only at
        the (project, vm_name) index.

        :raise StorageFull, StoreUnavailable, sql.DatabaseError: as for `record`.
        """
        cutoff = (self._db.clock() - self.max_age).isoformat()
        async with self._db.write(durable=False) as conn:
            deleted = await _prune_old(conn, cutoff)
            over = await conn.fetchall(
                "SELECT project, vm_name FROM events GROUP BY project, vm_name HAVING COUNT(*) > ?",
                (self.per_vm_limit,),
            )
            for project, vm_name in over:
                deleted += await conn.execute(
                    "DELETE FROM events WHERE project = ? AND vm_name = ? AND id <= (SELECT id FROM"
                    " events WHERE project = ? AND vm_name = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (project, vm_name, project, vm_name, self.per_vm_limit),
                )
        return deleted

    async def prune_forever(self, *, period: float = PRUNE_PERIOD_SECONDS) -> None:
        """Prune now and every `period` seconds until cancelled; a failed prune is logged and
        tried again at the next period (retention may lag, nothing else depends on it)."""
        while True:
            try:
                deleted = await self.prune()
            except FAILURES as err:
                log.warning("events_prune_failed", error=str(err))
            else:
                if deleted:
                    log.info("events_pruned", deleted=deleted)
            await asyncio.sleep(period)


async def insert_events(conn: Transaction, events: Sequence[NewEvent], *, now: datetime) -> None:
    """Write `events` inside the caller's transaction: they commit or roll back with it."""
    if not events:
        return
    time = now.isoformat()
    await _insert(conn, [_row(event, time) for event in events])


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace-id part (32 hex digits) of a W3C `traceparent`; None when absent or malformed."""
    context = span_context_of(traceparent)
    return format(context.trace_id, "032x") if context is not None else None


def current_trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def bounded(message: str) -> str:
    """`message` cut to MESSAGE_MAX_BYTES of UTF-8 (never inside a character), marked when cut."""
    encoded = message.encode()
    if len(encoded) <= MESSAGE_MAX_BYTES:
        return message
    room = MESSAGE_MAX_BYTES - len(TRUNCATED.encode())
    return encoded[:room].decode(errors="ignore") + TRUNCATED


def _row(event: NewEvent, time: str) -> Row:
    trace_id = event.trace_id if event.trace_id is not None else current_trace_id()
    return (
        event.uid,
        event.project,
        event.vm_name,
        time,
        event.type.value,
        event.reason,
        bounded(event.message),
        trace_id,
    )


async def _insert(conn: Transaction, rows: list[Row]) -> None:
    await conn.executemany(
        "INSERT INTO events (uid, project, vm_name, time, type, reason, message, trace_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


async def _prune_old(conn: Transaction, cutoff: str) -> int:
    """Delete the events older than `cutoff` (ISO time), by id below the oldest young one."""
    row = await conn.fetchone("SELECT id FROM events WHERE time >= ? ORDER BY id LIMIT 1", (cutoff,))
    if row is not None:
        return await conn.execute("DELETE FROM events WHERE id < ?", (row[0],))
    return await conn.execute("DELETE FROM events")


def _decode(row: ResultRow) -> EventRecord:
    return EventRecord(
        id=row[0],
        uid=row[1],
        project=row[2],
        vm_name=row[3],
        time=datetime.fromisoformat(row[4]),
        type=EventType(row[5]),
        reason=row[6],
        message=row[7],
        trace_id=row[8],
    )
