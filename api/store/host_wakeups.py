"""Waking the right controller when a VM is placed on (or drained from) its host, on PostgreSQL.

Every commit already wakes every process through the change feed (api/store/postgres.py), and
each controller then reads its own list within a second. A placement also sends
`NOTIFY tofu_qemu_placements, 'HOST UID'` in its transaction (delivered at commit), and each
controller LISTENs on a dedicated connection of its own for its host's name, queueing the VM at
once. The change feed and the resync stay the safety nets: a notification lost while a
listener reconnects costs at most their delay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from api.store.sql import Dialect, Transaction

PLACEMENTS_CHANNEL = "tofu_qemu_placements"


async def notify_placed(conn: Transaction, dialect: Dialect, placed: Iterable[tuple[str, str]]) -> None:
    """Inside a write transaction: tell host's controller of each (host, uid) at commit.
    SQLite has one controller, woken in-process by the commit itself."""
    if dialect is not Dialect.POSTGRESQL:
        return
    # One round trip for the lot (the driver pipelines executemany), not one per VM: the
    # placement transaction holds the write lock that every status write waits for.
    await conn.executemany(
        "SELECT pg_notify(?, ?)", [(PLACEMENTS_CHANNEL, f"{host} {uid}") for host, uid in placed]
    )


async def listen_for_placements(url: str, host: str, wake: Callable[[str], None]) -> None:
    """Call `wake(uid)` for every VM placed on or drained from `host`, until cancelled. A lost
    connection is made again with the change feed's backoff (at most 5 s), not the slower one of
    a failed event source: after an outage this listener is back as soon as the feed is."""
    # Only a controller on PostgreSQL listens: a process on SQLite never imports the driver.
    from api.store.postgres import listen_forever

    def placed(payload: str) -> None:
        target, _, uid = payload.partition(" ")
        if target == host and uid:
            wake(uid)

    await listen_forever(url, PLACEMENTS_CHANNEL, placed)
