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
def database_urls(choice: str | None, count: int = 1) -> Iterator[list[str]]:
    """No URL for SQLite only (`choice` None); `choice` itself; or, for `private`, the URLs of
    `count` new databases on a private cluster (one per PostgreSQL server of the run)."""
    if choice is None:
        yield []
        return
    if choice != PRIVATE:
        if count > 1:
            raise SystemExit(
                f"{count} PostgreSQL servers need databases of their own: use --database-url private"
            )
        yield [choice]
        return
    # Importing _common put the checkout on sys.path, so its tests/ package is importable.
    from tests.postgres import PostgresCluster

    cluster = PostgresCluster()
    try:
        cluster.start()
        urls = [cluster.create_database() for _ in range(count)]
        progress(f"private PostgreSQL {cluster.bin.parent.name} on 127.0.0.1:{cluster.port} (fsync off)")
        yield urls
    finally:
        cluster.remove()
