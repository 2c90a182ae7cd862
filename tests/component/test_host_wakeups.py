"""On PostgreSQL, a placement wakes its host's controller through its own LISTEN connection:
only the host named, at commit, and a drain wakes the host the VMs leave."""

from __future__ import annotations

import asyncio
from pathlib import Path

from api.hosts import Resources
from api.store import open_store
from api.store.host_wakeups import listen_for_placements
from api.store.hosts import Hosts, Registration
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
        for uid in ("for-a", "for-b"):
            await add_vm(db, uid)
        await asyncio.sleep(0.5)  # the listener is connected and LISTENing
        await hosts.place({"for-b": "b", "for-a": "a"}, {})
        async with asyncio.timeout(WAIT_SECONDS):
            assert await woken.get() == "for-a"
        await hosts.place({}, {})
        moved, _kept = await hosts.drain("a")
        assert moved == ["for-a"]
        async with asyncio.timeout(WAIT_SECONDS):
            assert await woken.get() == "for-a"
        await asyncio.sleep(0.3)
        assert woken.empty(), "host a was woken for a VM of host b"
    finally:
        listener.cancel()
        await db.close()
