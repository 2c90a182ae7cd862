"""Fixtures for every kind of test, and the session's private PostgreSQL cluster."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.postgres import PostgresCluster


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """Server commands run in-process set umask 077 (controller/cli.py); the next test must not
    inherit it, nor a file-mode test depend on what ran before it."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield
    os.umask(previous)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One cluster per test session, started on first use and removed at the end."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def own_postgres_cluster() -> Iterator[PostgresCluster]:
    """A cluster of the test's own, for tests that stop or restart it: the session's must stay up."""
    own = PostgresCluster()
    own.start()
    try:
        yield own
    finally:
        own.remove()
