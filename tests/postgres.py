"""A private PostgreSQL cluster for tests: Debian's server binaries, a temp dir, a free port.

initdb refuses to run as root, so as root every server command runs as the `postgres` user
(`runuser`), in a temp dir that user owns. The cluster listens on 127.0.0.1 only, on a port
picked free, with its unix socket in its own dir; trust authentication is safe there because
nothing but this machine's loopback reaches it. Each test gets a database of its own.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
START_TIMEOUT_SECONDS = 60
_names = itertools.count(1)


def postgres_bin() -> Path:
    """The newest installed server's bin dir. :raise RuntimeError: PostgreSQL is not installed."""
    found = [Path(path) for path in glob.glob(PG_BIN_GLOB) if (Path(path) / "initdb").exists()]
    if not found:
        raise RuntimeError(
            f"PostgreSQL is not installed (no initdb in {PG_BIN_GLOB}); run hack/install-postgres"
        )
    return max(found, key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresCluster:
    """initdb'd in a temp dir; `start`, `stop`, `create_database`, `remove`."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="tofu-qemu-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as_owner = ["runuser", "-u", "postgres", "--"]
        self._run("mkdir", "-m", "700", str(self.sockets))
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        settings = (
            f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{self.sockets}'\nmax_connections = 200\n"
            # Test data only: no fsync (a killed test cluster is thrown away, never restarted).
            "fsync = off\nfull_page_writes = off\n"
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(settings)

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
            "-t", str(START_TIMEOUT_SECONDS), "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self) -> str:
        """A new empty database (from template0); returns its URL."""
        name = f"t{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            [*self._as_owner, *argv], capture_output=True, text=True, timeout=START_TIMEOUT_SECONDS + 30
        )
        if result.returncode != 0:
            server_log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {result.stderr}{server_log[-2000:]}")
