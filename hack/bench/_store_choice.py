"""Which PostgreSQL a benchmark compares with SQLite: a URL the operator gives, or a private
cluster the benchmark starts itself (`--database-url private`) and removes when it ends.

The private cluster is the tests' (tests/postgres.py): Debian's server binaries, initdb in a
temp dir (as the `postgres` user when run as root), 127.0.0.1 and a free port, fsync off. It
is a throw-away like the benchmark's workspace, so fsync off costs it nothing; a URL of the
operator's own server measures that server as it is configured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from _common import progress

PRIVATE = "private"


@contextlib.contextmanager
def database_url(choice: str | None) -> Iterator[str | None]:
    """`choice` as given, or the URL of a new database on a private cluster for `private`."""
    if choice != PRIVATE:
        yield choice
        return
    # Importing _common put the checkout on sys.path, so its tests/ package is importable.
    from tests.postgres import PostgresCluster

    cluster = PostgresCluster()
    try:
        cluster.start()
        url = cluster.create_database()
        progress(f"private PostgreSQL {cluster.bin.parent.name} on 127.0.0.1:{cluster.port} (fsync off)")
        yield url
    finally:
        cluster.remove()
