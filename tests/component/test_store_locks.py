"""The store keeps SQLite's locks while it is open, so other processes may read it safely.

SQLite in WAL mode maps the -shm file and holds a shared POSIX lock on it while a connection is
open. POSIX locks belong to the process, and closing *any* descriptor of the file drops them all,
so a server that opened and closed its own store files (to fix their modes) after SQLite opened
them was left holding no lock. Any other process that opened the store (the `tofu-qemu` CLI, the
other half of split mode, an operator's `sqlite3`) then took itself for the only user: opening,
it reset the -shm under the server's mapping (the server died of SIGBUS at its next query);
closing, it checkpointed and deleted the WAL, and what the server wrote next went to a deleted
file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

from api.store.db import DB_FILE_NAME

# The server side, in a child: a SIGBUS there must fail this test, not end the test run.
SERVER = """
import asyncio, sys
from pathlib import Path
from api.store import StateStore, open_database
from api.testing.tfstate import encode, vm_state
from api.tfstate import extract_vms, parse_state

async def main() -> None:
    database = await open_database(Path(sys.argv[1]))
    store = StateStore(database)
    print("open", flush=True)
    sys.stdin.readline()  # the other process has opened, read and closed the store
    for serial in range(1, 6):
        body = encode(vm_state(serial, {"web": {}}))
        summary = parse_state(body)
        await store.write("lab", body, summary, extract_vms(summary.document), lock_id=None)
    print("wrote", flush=True)
    await database.close()

asyncio.run(main())
"""


async def test_another_process_reading_the_open_store_does_not_break_the_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVER,
        str(data_dir),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert server.stdin is not None
        assert server.stdout is not None
        assert await asyncio.wait_for(server.stdout.readline(), 30) == b"open\n"

        # Like the `tofu-qemu` CLI or an operator's sqlite3: read-write, so closing it as the last
        # user would checkpoint the WAL and delete it, with the -shm, from under the server.
        other = sqlite3.connect(data_dir / DB_FILE_NAME)
        try:
            # It reads the server's schema, still only in the WAL, through the server's -shm.
            assert other.execute("SELECT count(*) FROM projects").fetchone() == (0,)
        finally:
            other.close()
        assert (data_dir / f"{DB_FILE_NAME}-wal").exists(), "the WAL was deleted from under the server"

        server.stdin.write(b"go\n")
        output, errors = await asyncio.wait_for(server.communicate(), 30)
        assert (server.returncode, output) == (0, b"wrote\n"), errors.decode()
    finally:
        if server.returncode is None:  # a failed assertion: the child must not outlive the test
            server.kill()
            await server.wait()
    # What the server wrote after the other process left is in the store, not in a deleted WAL.
    after = sqlite3.connect(data_dir / DB_FILE_NAME)
    try:
        assert after.execute("SELECT count(*) FROM state_versions").fetchone() == (5,)
    finally:
        after.close()
