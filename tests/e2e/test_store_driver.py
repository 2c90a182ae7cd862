"""The PostgreSQL driver is loaded only by a process whose store is PostgreSQL (issue 19: psycopg
and its pool cost a `serve` on SQLite ~10 MB of RSS for nothing).

A real `tofu-qemu serve` writes a state and answers from its store, then its memory map is read:
psycopg's compiled module (psycopg_binary) or libpq in it means the driver was imported. The
same look at a server on PostgreSQL finds them (tests/e2e/test_postgres_store.py), so the look
itself is shown to work.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.harness import ServerProcess

pytestmark = pytest.mark.e2e

DRIVER_FILES = ("psycopg", "libpq")


def driver_files_mapped(pid: int) -> set[str]:
    """The files of the PostgreSQL driver mapped into process `pid`."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {line.split()[-1] for line in maps.splitlines() if any(name in line for name in DRIVER_FILES)}


def use_the_store(server: ServerProcess) -> None:
    """A state write, a read of it and a listing: the store's paths a request takes."""
    server.declare_vms("driver", 1, {})
    assert server.request("GET", "/state/driver").status == 200
    assert server.get_json("/api/v1/hosts")["items"]


def test_serve_on_sqlite_never_loads_the_postgresql_driver(spawn_server: SpawnServer, tmp_path: Path) -> None:
    server = spawn_server(tmp_path / "data")
    use_the_store(server)
    assert server.pid is not None
    assert driver_files_mapped(server.pid) == set()
