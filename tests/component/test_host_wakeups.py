"""On PostgreSQL, a placement wakes its host's controller through its own LISTEN connection:
only the host named, at commit, and a drain wakes the host the VMs leave."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import psycopg

from api.hosts import Resources
from api.store import open_store
from api.store.host_wakeups import PLACEMENTS_CHANNEL, listen_for_placements
from api.store.hosts import Hosts, Registration
from api.store.postgres import LISTEN_BACKOFF_SECONDS
from tests.component.test_hosts_store import add_vm
from tests.postgres import PostgresCluster

WAIT_SECONDS = 10.0


async def test_placements_wake_only_the_host_they_name(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = postgres_cluster.create_database()
    db = await open_store(tmp_path / "data", database_url=url)
    woken: asyncio.Queue[str] = asyncio.Queue()
    listener = asyncio.create_task(listen_for_placements(url, "a", woken.put_nowait))
    try:
        hosts = Hosts(db)
        await hosts.register(Registration("a", {}, Resources(2, 4096, 10), lease_seconds=15.0))
        for uid in ("for-a", "for-b", "also-a"):
            await add_vm(db, uid)
        await asyncio.sleep(0.5)  # the listener is connected and LISTENing
        await hosts.place({"for-b": "b", "for-a": "a", "also-a": "a"}, {})
        async with asyncio.timeout(WAIT_SECONDS):
            assert {await woken.get(), await woken.get()} == {"for-a", "also-a"}
        await hosts.place({}, {})
        moved, _kept = await hosts.drain("a")
        assert sorted(moved) == ["also-a", "for-a"]
        async with asyncio.timeout(WAIT_SECONDS):
            assert {await woken.get(), await woken.get()} == {"for-a", "also-a"}
        await asyncio.sleep(0.3)
        assert woken.empty(), "host a was woken for a VM of host b"
    finally:
        listener.cancel()
        await db.close()


async def test_the_listener_outlives_a_postgres_restart(own_postgres_cluster: PostgresCluster) -> None:
    """It reconnects by itself, with the change feed's backoff (at most LISTEN_BACKOFF_SECONDS[1]
    between tries), rather than ending and waiting for its caller's slower retry."""
    url = own_postgres_cluster.create_database()
    woken: asyncio.Queue[str] = asyncio.Queue()
    listener = asyncio.create_task(listen_for_placements(url, "a", woken.put_nowait))
    try:
        await asyncio.sleep(0.5)  # connected and LISTENing
        own_postgres_cluster.stop()
        await asyncio.sleep(LISTEN_BACKOFF_SECONDS[1] + 1)  # long enough for the backoff to reach its cap
        own_postgres_cluster.start()
        started = time.monotonic()
        while True:
            assert not listener.done(), "the listener ended on a lost connection"
            with psycopg.connect(url, autocommit=True) as connection:
                connection.execute("SELECT pg_notify(%s, %s)", (PLACEMENTS_CHANNEL, "a back"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    assert await woken.get() == "back"
                    break
            assert time.monotonic() - started < LISTEN_BACKOFF_SECONDS[1] + WAIT_SECONDS
        print(f"woken {time.monotonic() - started:.1f} s after PostgreSQL started")
    finally:
        listener.cancel()
