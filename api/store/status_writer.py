"""The controller's side of the VM objects: read by uid, write status, finalize.

Kept apart from VMStore so the API server never holds a way to write status.

Status writes are group-committed. Many VMs change phase at once (an apply that creates 50,
a host that wakes up): one transaction per write would queue them behind one fsync each, and
on a machine whose CPUs are busy booting those very guests every round trip to SQLite's thread
is slow. So a write joins a batch; whichever writer gets the flush lock first commits every
write pending at that moment in one transaction, and the others find theirs done.

A write carries the events of the reconcile that computed it, and they are inserted in the
batch's transaction: an event exists exactly when the status it came with was stored (or found
unchanged). A write replaced before its flush hands its events to the one replacing it, so the
newest status wins and no event is lost; a VM gone meanwhile keeps neither.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from api.store.db import Database, Transaction
from api.store.events import EventLog, NewEvent, current_trace_id, insert_events
from api.store.records import StatusConflict as StatusConflict
from api.store.vms import VM_COLUMNS, VMRecord, decode_vm_row
from api.store.watch import bury

# The objects a host's controller reconciles: those placed on it, and the unplaced ones that need
# no host (being deleted, or with a spec that cannot run), which any controller may settle.
MINE = "(host = ? OR (host IS NULL AND (deleted_at IS NOT NULL OR spec_error IS NOT NULL)))"


@dataclass(slots=True)
class _PendingWrite:
    encoded: str
    # Inserted with the status, also when it is unchanged or replaced by a newer write.
    events: list[NewEvent]
    # True: written; False: unchanged or replaced by a newer write; StatusConflict: VM gone.
    done: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class VMStatusWriter:
    def __init__(self, db: Database, *, host: str | None = None) -> None:
        """`host`: see only the objects that host's controller reconciles (None: every object)."""
        self._db = db
        self._mine = "" if host is None else f" AND {MINE}"
        self._mine_params: tuple[str, ...] = () if host is None else (host,)
        self._events = EventLog(db)
        self._pending: dict[str, _PendingWrite] = {}
        self._flush_lock = asyncio.Lock()
        # resourceVersions produced by this writer's own status writes: change detection skips
        # them, so a status write does not queue the VM for another reconcile.
        self.written_versions: dict[str, int] = {}

    async def get(self, uid: str) -> VMRecord | None:
        rows = await self._db.read(
            f"SELECT {VM_COLUMNS} FROM vms WHERE uid = ?{self._mine}",  # noqa: S608
            (uid, *self._mine_params),
        )
        return decode_vm_row(rows[0]) if rows else None

    async def versions(self) -> dict[str, int]:
        """Every object's uid and resourceVersion: what change detection compares."""
        rows = await self._db.read(
            f"SELECT uid, resource_version FROM vms WHERE TRUE{self._mine}",  # noqa: S608
            self._mine_params,
        )
        return {row[0]: row[1] for row in rows}

    async def write_status(self, uid: str, status: dict[str, Any], events: Sequence[NewEvent] = ()) -> bool:
        """Store `status` for `uid` unless it is unchanged, and `events` in the same transaction.
        Returns whether the status was written.

        :raise StatusConflict: the object no longer exists (nothing stored).
        :raise StorageFull, StoreUnavailable: the batch could not be committed (nothing stored).
        """
        # The caller's trace, taken now: another reconcile may flush the batch.
        traced = [replace(event, trace_id=event.trace_id or current_trace_id()) for event in events]
        write = _PendingWrite(json.dumps(status, sort_keys=True, separators=(",", ":")), traced)
        replaced = self._pending.get(uid)
        if replaced is not None:
            write.events[:0] = replaced.events
            replaced.done.set_result(False)
        self._pending[uid] = write
        try:
            async with self._flush_lock:
                if not write.done.done():
                    batch, self._pending = self._pending, {}
                    await self._flush(batch)
        except asyncio.CancelledError:
            if self._pending.get(uid) is write:
                del self._pending[uid]
            raise
        return await write.done

    async def _flush(self, batch: dict[str, _PendingWrite]) -> None:
        """Commit `batch` in one transaction and settle every write in it."""
        try:
            # Status is recomputed from what is observed, so a write lost with the machine
            # costs nothing; an fsync per batch costs every VM waiting on it.
            async with self._db.write(durable=False) as conn:
                current = await _current_statuses(conn, list(batch))
                changed = [uid for uid in batch if uid in current and current[uid] != batch[uid].encoded]
                versions = await _store(conn, {uid: batch[uid].encoded for uid in changed})
                told = [event for uid, write in batch.items() if uid in current for event in write.events]
                await insert_events(conn, told, now=self._db.clock())
        except asyncio.CancelledError:
            # The flushing writer was cancelled and the transaction rolled back; the writes of
            # the others still waiting go to whoever flushes next.
            for uid, write in batch.items():
                if write.done.done():
                    continue
                if uid in self._pending:
                    self._pending[uid].events[:0] = write.events
                    write.done.set_result(False)
                else:
                    self._pending[uid] = write
            raise
        except Exception as err:
            for write in batch.values():
                if not write.done.done():
                    write.done.set_exception(err)
            return
        self.written_versions.update(versions)
        for uid, write in batch.items():
            if write.done.done():
                continue
            if uid not in current:
                write.done.set_exception(StatusConflict(f"VM {uid} no longer exists"))
            else:
                write.done.set_result(uid in versions)

    async def finalize(self, uid: str) -> None:
        """Remove a deleting object once its resources are released. Idempotent.

        In the same transaction: a tombstone (api/store/watch.py), so watches resumed from an
        older resourceVersion see it DELETED, and a `Deleted` event.
        """
        self.written_versions.pop(uid, None)
        async with self._db.write() as conn:
            row = await conn.fetchone(
                f"SELECT {VM_COLUMNS} FROM vms WHERE uid = ? AND deleted_at IS NOT NULL",  # noqa: S608
                (uid,),
            )
            if row is None:
                return
            record = decode_vm_row(row)
            await bury(conn, record, now=self._db.clock())
            await conn.execute("DELETE FROM vms WHERE uid = ?", (uid,))
            await self._events.record(
                NewEvent(
                    uid=uid,
                    project=record.project,
                    vm_name=record.name,
                    reason="Deleted",
                    message="resources released; the object is removed",
                ),
                conn=conn,
            )


async def _current_statuses(conn: Transaction, uids: list[str]) -> dict[str, str | None]:
    marks = ",".join("?" * len(uids))
    rows = await conn.fetchall(f"SELECT uid, status FROM vms WHERE uid IN ({marks})", uids)  # noqa: S608
    return {row[0]: row[1] for row in rows}


async def _store(conn: Transaction, statuses: dict[str, str]) -> dict[str, int]:
    """Write `statuses` with consecutive new resourceVersions; returns uid -> version."""
    if not statuses:
        return {}
    row = await conn.fetchone(
        "UPDATE resource_versions SET value = value + ? WHERE id = 1 RETURNING value", (len(statuses),)
    )
    assert row is not None
    first = int(row[0]) - len(statuses) + 1
    versions = {uid: first + offset for offset, uid in enumerate(statuses)}
    await conn.executemany(
        "UPDATE vms SET status = ?, resource_version = ? WHERE uid = ?",
        [(encoded, versions[uid], uid) for uid, encoded in statuses.items()],
    )
    return versions
