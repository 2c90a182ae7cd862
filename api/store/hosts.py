"""The hosts table and the leases table: registration, lease renewal, cordon, drain, and the
election of one scheduler (docs/multi-host.md).

Lease times are the database's clock (`Database.database_now`), never a host's own: two hosts
whose clocks disagree still agree on whose lease ran out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from api.hosts import Host, PlacedVM, Resources, demand_of
from api.store.db import Database, Transaction
from api.store.errors import NotFound
from api.store.events import insert_events
from api.store.host_wakeups import notify_placed
from api.store.records import EventType, NewEvent
from api.store.sql import JSON_STRINGS

_HOST_COLUMNS = (
    "name, labels, cpus, memory_mib, ports, cordoned, registered_at, lease_renewed_at, lease_seconds, epoch"
)


@dataclass(frozen=True, slots=True)
class Registration:
    """What a controller says of its host when it starts."""

    name: str
    labels: dict[str, str]
    capacity: Resources
    lease_seconds: float


def _host(row: Sequence[Any]) -> Host:
    name, labels, cpus, memory_mib, ports, cordoned, registered, renewed, seconds, epoch = row
    return Host(
        name=str(name),
        labels=json.loads(labels),
        capacity=Resources(int(cpus), int(memory_mib), int(ports)),
        cordoned=bool(cordoned),
        registered_at=datetime.fromisoformat(registered),
        lease_renewed_at=datetime.fromisoformat(renewed),
        lease_seconds=float(seconds),
        epoch=int(epoch),
    )


class Hosts:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def register(self, registration: Registration) -> Host:
        """Record the host (again) with a fresh lease and the next epoch; a cordon is kept."""
        now = (await self._db.database_now()).isoformat()
        async with self._db.write() as conn:
            await conn.execute(
                f"INSERT INTO hosts ({_HOST_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, 1)"  # noqa: S608
                " ON CONFLICT (name) DO UPDATE SET labels = excluded.labels, cpus = excluded.cpus,"
                " memory_mib = excluded.memory_mib, ports = excluded.ports,"
                " registered_at = excluded.registered_at, lease_renewed_at = excluded.lease_renewed_at,"
                " lease_seconds = excluded.lease_seconds, epoch = hosts.epoch + 1",
                (
                    registration.name,
                    json.dumps(registration.labels, sort_keys=True),
                    registration.capacity.cpus,
                    registration.capacity.memory_mib,
                    registration.capacity.ports,
                    now,
                    now,
                    registration.lease_seconds,
                ),
            )
            row = await conn.fetchone(
                f"SELECT {_HOST_COLUMNS} FROM hosts WHERE name = ?",  # noqa: S608
                (registration.name,),
            )
        assert row is not None
        return _host(tuple(row))

    async def renew(self, name: str, epoch: int) -> bool:
        """Stamp the host's lease with the database's clock. False: the host is not registered,
        or no longer at `epoch` (registered again, or its VMs moved away: it is fenced)."""
        now = (await self._db.database_now()).isoformat()
        # Quiet: a renewal changes nothing a watcher acts on (the scheduler looks at leases on
        # its own period), and every process would otherwise wake for it every few seconds.
        async with self._db.write(durable=False, notify=False) as conn:
            return (
                await conn.execute(
                    "UPDATE hosts SET lease_renewed_at = ? WHERE name = ? AND epoch = ?", (now, name, epoch)
                )
                > 0
            )

    async def all(self) -> list[Host]:
        rows = await self._db.read(f"SELECT {_HOST_COLUMNS} FROM hosts ORDER BY name")  # noqa: S608
        return [_host(tuple(row)) for row in rows]

    async def set_cordoned(self, name: str, cordoned: bool) -> Host:
        """:raise NotFound: no host of that name."""
        async with self._db.write() as conn:
            row = await conn.fetchone(
                f"UPDATE hosts SET cordoned = ? WHERE name = ? RETURNING {_HOST_COLUMNS}",  # noqa: S608
                (int(cordoned), name),
            )
        if row is None:
            raise NotFound(f"no host named {name!r}")
        return _host(tuple(row))

    async def drain(self, name: str, *, force: bool = False) -> tuple[list[str], list[str]]:
        """Cordon the host and unplace its VMs that hold no data, so the scheduler moves them;
        `force`: every VM, also those whose retained disk stays behind on this host, and the
        host is fenced (epoch + 1): its controller kills what moved before it writes again.

        Returns (moved, kept): the uids unplaced and those left because a disk of theirs is
        retained (`reclaimPolicy: Retain`) and lives on this host.
        :raise NotFound: no host of that name.
        """
        await self.set_cordoned(name, True)
        async with self._db.write() as conn:
            rows = await conn.fetchall(
                "SELECT uid, spec FROM vms WHERE host = ? AND deleted_at IS NULL ORDER BY uid", (name,)
            )
            kept = [] if force else [str(uid) for uid, spec in rows if _holds_data(json.loads(spec))]
            if force:
                await conn.execute("UPDATE hosts SET epoch = epoch + 1 WHERE name = ?", (name,))
            note = f"{'force-' if force else ''}drained from host {name}"
            moved = await self._set(
                conn, {str(uid): (None, note) for uid, _spec in rows if str(uid) not in kept}
            )
            # The drained host's controller releases them at once.
            await notify_placed(conn, self._db.dialect, ((name, uid) for uid in moved))
        return moved, kept

    async def anything_to_schedule(self) -> bool:
        """Whether a live VM waits for a host, or a placed one carries a note to clear: an index
        probe, so that a pass with nothing to do reads no VM (the scheduler runs at every commit)."""
        rows = await self._db.read(
            "SELECT 1 FROM vms WHERE deleted_at IS NULL AND ((host IS NULL AND spec_error IS NULL)"
            " OR (host IS NOT NULL AND scheduling IS NOT NULL)) LIMIT 1"
        )
        return bool(rows)

    async def placement_version(self) -> tuple[object, ...]:
        """Changes whenever the live VMs a placement pass reads change: one is created, changes
        spec, starts deleting, is removed, or gains or loses a host or a note, or an instance
        type that may size one changes (one read)."""
        rows = await self._db.read(
            "SELECT (SELECT COUNT(*) FROM vms), (SELECT COALESCE(SUM(generation), 0) FROM vms),"
            " (SELECT COUNT(deleted_at) FROM vms), (SELECT COUNT(host) FROM vms),"
            " (SELECT COUNT(scheduling) FROM vms), (SELECT COUNT(*) FROM instance_types),"
            " (SELECT COALESCE(MAX(resource_version), 0) FROM instance_types)"
        )
        return tuple(rows[0])

    async def placed(self) -> list[PlacedVM]:
        """Every live VM with its host (None: not placed) and what it asks of it."""
        rows = await self._db.read(
            "SELECT uid, project, name, host, spec, spec_error, scheduling FROM vms"
            # An unplaced VM whose spec cannot run needs no host (every controller settles it).
            " WHERE deleted_at IS NULL AND (host IS NOT NULL OR spec_error IS NULL)"
            " ORDER BY created_at, uid"
        )
        placed = []
        for uid, project, name, host, spec, error, scheduling in rows:
            decoded = None if error else json.loads(spec)
            placed.append(
                PlacedVM(
                    uid=str(uid),
                    project=str(project),
                    name=str(name),
                    host=host,
                    demand=demand_of(decoded),
                    scheduling=scheduling,
                    holds_data=decoded is not None and _holds_data(decoded),
                )
            )
        return placed

    async def place(self, assignments: dict[str, str], unschedulable: dict[str, str]) -> list[str]:
        """Place each VM of `assignments` on its host, unless it was placed meanwhile or is being
        deleted, with a `Scheduled` event in the same transaction; note why each of
        `unschedulable` cannot be. Returns the uids placed.

        A few statements whatever the number of VMs: an apply of thousands is placed in one
        short transaction."""
        async with self._db.write() as conn:
            placed = await self._set(
                conn, {uid: (host, None) for uid, host in assignments.items()}, only_unplaced=True
            )
            await self._record(
                conn, {uid: f"placed on host {assignments[uid]}" for uid in placed}, "Scheduled"
            )
            await self._set(
                conn, {uid: (None, reason) for uid, reason in unschedulable.items()}, only_unplaced=True
            )
            await notify_placed(conn, self._db.dialect, ((assignments[uid], uid) for uid in placed))
        return placed

    async def note_placed(self, notes: dict[str, str | None]) -> list[str]:
        """Set (or clear, None) the note of placed VMs, keeping their host: that their host is
        lost, with a `HostLost` Warning event in the same transaction. Returns the uids whose
        note changed."""
        async with self._db.write() as conn:
            rows = await conn.fetchall(
                f"SELECT uid, host FROM vms WHERE uid IN ({self._uids}) AND host IS NOT NULL",  # noqa: S608
                (json.dumps(list(notes)),),
            )
            changed = await self._set(conn, {str(uid): (str(host), notes[str(uid)]) for uid, host in rows})
            lost = {uid: notes[uid] or "" for uid in changed if notes[uid]}
            await self._record(conn, lost, "HostLost", EventType.WARNING)
        return changed

    async def reschedule(self, moves: dict[str, tuple[str, str]], why: dict[str, str]) -> list[str]:
        """Move each VM of `moves` (uid -> (lost host, new host)) that is still on its lost host,
        with a `Rescheduled` event, and fence the lost hosts (epoch + 1) in the same
        transaction: a controller of theirs that wakes cannot write for them any more.
        `why`: lost host -> the reason, for the events. Returns the uids moved."""
        if not moves:
            return []
        async with self._db.write() as conn:
            rows = await conn.fetchall(
                f"SELECT uid, host FROM vms WHERE uid IN ({self._uids}) AND deleted_at IS NULL",  # noqa: S608
                (json.dumps(list(moves)),),
            )
            still = {str(uid) for uid, host in rows if host == moves[str(uid)][0]}
            moved = await self._set(
                conn, {uid: (new, None) for uid, (_old, new) in moves.items() if uid in still}
            )
            # Their status is the lost host's (its pid, ports, Running): the new host writes its own.
            await conn.execute(
                f"UPDATE vms SET status = NULL WHERE uid IN ({self._uids})",  # noqa: S608
                (json.dumps(moved),),
            )
            lost = sorted({moves[uid][0] for uid in moved})
            await conn.executemany(
                "UPDATE hosts SET epoch = epoch + 1 WHERE name = ?", [(host,) for host in lost]
            )
            messages = {
                uid: f"from host {moves[uid][0]} to host {moves[uid][1]}: {why[moves[uid][0]]}"
                for uid in moved
            }
            await self._record(conn, messages, "Rescheduled", EventType.WARNING)
            await notify_placed(conn, self._db.dialect, ((moves[uid][1], uid) for uid in moved))
        return moved

    async def placed_on(self, name: str) -> list[str]:
        """The uids of the VMs placed on host `name`, deleted or not."""
        rows = await self._db.read("SELECT uid FROM vms WHERE host = ? ORDER BY uid", (name,))
        return [str(row[0]) for row in rows]

    async def record(self, messages: dict[str, str], reason: str, kind: EventType = EventType.NORMAL) -> None:
        """Events of `reason` for the VMs of `messages` (uid -> message), in one transaction."""
        async with self._db.write() as conn:
            await self._record(conn, messages, reason, kind)

    @property
    def _uids(self) -> str:
        """A subquery of the uids of one JSON array parameter (any number, one placeholder)."""
        return JSON_STRINGS[self._db.dialect]

    async def _set(
        self,
        conn: Transaction,
        wanted: dict[str, tuple[str | None, str | None]],
        *,
        only_unplaced: bool = False,
    ) -> list[str]:
        """Give each live VM of `wanted` its (host, note), each change with a new resourceVersion.
        `only_unplaced`: leave VMs placed meanwhile alone. Returns the uids changed, in order."""
        if not wanted:
            return []
        guard = " AND host IS NULL" if only_unplaced else ""
        rows = await conn.fetchall(
            f"SELECT uid, host, scheduling FROM vms WHERE uid IN ({self._uids})"  # noqa: S608
            f" AND deleted_at IS NULL{guard}",
            (json.dumps(list(wanted)),),
        )
        differ = {str(uid) for uid, host, note in rows if (host, note) != wanted[str(uid)]}
        changed = [uid for uid in wanted if uid in differ]
        if not changed:
            return []
        row = await conn.fetchone(
            "UPDATE resource_versions SET value = value + ? WHERE id = 1 RETURNING value", (len(changed),)
        )
        assert row is not None
        first = int(row[0]) - len(changed) + 1
        await conn.executemany(
            "UPDATE vms SET host = ?, scheduling = ?, resource_version = ? WHERE uid = ?",
            [(*wanted[uid], first + offset, uid) for offset, uid in enumerate(changed)],
        )
        return changed

    async def _record(
        self, conn: Transaction, messages: dict[str, str], reason: str, kind: EventType = EventType.NORMAL
    ) -> None:
        """Events of `reason` for the VMs of `messages`, in the caller's transaction."""
        if not messages:
            return
        rows = await conn.fetchall(
            f"SELECT uid, project, name FROM vms WHERE uid IN ({self._uids})",  # noqa: S608
            (json.dumps(list(messages)),),
        )
        events = [
            NewEvent(str(uid), str(project), str(name), reason, messages[str(uid)], kind)
            for uid, project, name in rows
        ]
        await insert_events(conn, events, now=self._db.clock())

    async def take_over_renamed(self, name: str) -> list[str]:
        """SQLite: one machine holds the store, so every other host is this one under an older
        name (a container gets a new hostname when it is re-created): its VMs, ports and disks
        become `name`'s and its row goes. Returns the names taken over."""
        async with self._db.write() as conn:
            others = [
                str(row[0]) for row in await conn.fetchall("SELECT name FROM hosts WHERE name != ?", (name,))
            ]
            rows = await conn.fetchall("SELECT uid FROM vms WHERE host IS NOT NULL AND host != ?", (name,))
            await self._set(conn, {str(uid): (name, None) for (uid,) in rows})
            await conn.execute("UPDATE port_allocations SET host = ? WHERE host != ?", (name, name))
            await conn.execute("UPDATE disks SET host = ? WHERE host != ?", (name, name))
            await conn.execute("DELETE FROM hosts WHERE name != ?", (name,))
        return others

    async def adopt_legacy(self, name: str) -> bool:
        """Give host `name` what was written before hosts existed (VMs that have a status but no
        host, ports and disks of host ''), if it is the only host: then it is the machine that
        ran them. Returns whether it adopted."""
        async with self._db.write() as conn:
            others = await conn.fetchone("SELECT COUNT(*) FROM hosts WHERE name != ?", (name,))
            if others is None or int(others[0]) > 0:
                return False
            rows = await conn.fetchall(
                "SELECT uid FROM vms WHERE host IS NULL AND status IS NOT NULL AND deleted_at IS NULL"
            )
            await self._set(conn, {str(uid): (name, None) for (uid,) in rows})
            await conn.execute("UPDATE port_allocations SET host = ? WHERE host = ''", (name,))
            await conn.execute("UPDATE disks SET host = ? WHERE host = ''", (name,))
        return True


def _holds_data(spec: dict[str, Any]) -> bool:
    return any(disk.get("reclaimPolicy") == "Retain" for disk in spec.get("disks", ()))


class Leases:
    """Named leases: one holder at a time, until it stops renewing (database clock)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def hold(self, name: str, holder: str, seconds: float) -> bool:
        """Take or renew lease `name` for `holder`. False: another holder's lease still runs."""
        now = await self._db.database_now()
        async with self._db.write(durable=False, notify=False) as conn:  # quiet, as renew()
            row = await conn.fetchone(
                "SELECT holder, renewed_at, lease_seconds FROM leases WHERE name = ?", (name,)
            )
            if row is not None and row[0] != holder:
                expires = datetime.fromisoformat(row[1]) + timedelta(seconds=float(row[2]))
                if expires > now:
                    return False
            await conn.execute(
                "INSERT INTO leases (name, holder, renewed_at, lease_seconds) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                " renewed_at = excluded.renewed_at, lease_seconds = excluded.lease_seconds",
                (name, holder, now.isoformat(), seconds),
            )
        return True

    async def holder(self, name: str) -> str | None:
        rows = await self._db.read("SELECT holder FROM leases WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None
