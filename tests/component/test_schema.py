"""Migrations: a store migrated one step at a time equals a fresh one, on SQLite and PostgreSQL,
and both engines hold the same tables, columns and keys."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import psycopg
import pytest

from api.store.db import DB_FILE_NAME, open_database
from api.store.postgres import migrate, open_postgres, schema_version
from api.store.schema import MIGRATIONS
from tests.postgres import PostgresCluster

# table -> [(column, not null, part of the primary key)], in column order
Columns = dict[str, list[tuple[str, bool, bool]]]


def sqlite_migrate_to(path: Path, steps: int) -> None:
    """Apply the first `steps` migrations the way the store does, one transaction each."""
    with sqlite3.connect(path, isolation_level=None) as connection:
        for number, script in enumerate(MIGRATIONS[:steps], start=1):
            connection.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
    connection.close()


def sqlite_schema(path: Path) -> tuple[Columns, set[str]]:
    with sqlite3.connect(path) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = {
            table: [
                (name, bool(notnull) or pk > 0, pk > 0)
                for _cid, name, _type, notnull, _default, pk in connection.execute(
                    f"PRAGMA table_info({table})"
                )
            ]
            for table in tables
            if table != "sqlite_sequence"
        }
        indexes = {
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
        }
    connection.close()
    return columns, indexes


def postgres_schema(url: str) -> tuple[Columns, set[str]]:
    with psycopg.connect(url) as connection:
        keys = {
            (table, column)
            for table, column in connection.execute(
                "SELECT tc.table_name, kcu.column_name FROM information_schema.table_constraints tc"
                " JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name)"
                " WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = 'public'"
            )
        }
        columns: Columns = {}
        for table, column, nullable in connection.execute(
            "SELECT table_name, column_name, is_nullable FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name != 'schema_version'"
            " ORDER BY table_name, ordinal_position"
        ):
            columns.setdefault(table, []).append((column, nullable == "NO", (table, column) in keys))
        indexes = {
            row[0]
            for row in connection.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND indexname NOT LIKE '%_pkey'"
                " AND indexname NOT LIKE '%_key'"
            )
        }
    return columns, indexes


@pytest.mark.parametrize("steps", range(len(MIGRATIONS) + 1))
async def test_sqlite_migrated_step_by_step_equals_fresh(tmp_path: Path, steps: int) -> None:
    (tmp_path / "old").mkdir()
    sqlite_migrate_to(tmp_path / "old" / DB_FILE_NAME, steps)
    for data_dir in (tmp_path / "old", tmp_path / "fresh"):
        await (await open_database(data_dir)).close()
    assert sqlite_schema(tmp_path / "old" / DB_FILE_NAME) == sqlite_schema(tmp_path / "fresh" / DB_FILE_NAME)


@pytest.mark.parametrize("steps", range(len(MIGRATIONS) + 1))
async def test_postgres_migrated_step_by_step_equals_fresh(
    postgres_cluster: PostgresCluster, steps: int
) -> None:
    old, fresh = postgres_cluster.create_database(), postgres_cluster.create_database()
    async with await psycopg.AsyncConnection.connect(old, autocommit=True) as connection:
        for step in range(1, steps + 1):
            await migrate(connection, up_to=step)
            assert await schema_version(connection) == step
    for url in (old, fresh):
        await (await open_postgres(url)).close()
    assert postgres_schema(old) == postgres_schema(fresh)


async def test_both_engines_hold_the_same_tables_columns_and_keys(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """The PostgreSQL scripts are the SQLite ones with types mapped: nothing else may differ."""
    url = postgres_cluster.create_database()
    await (await open_postgres(url)).close()
    await (await open_database(tmp_path)).close()
    sqlite_columns, sqlite_indexes = sqlite_schema(tmp_path / DB_FILE_NAME)
    postgres_columns, postgres_indexes = postgres_schema(url)
    assert postgres_columns == sqlite_columns
    assert postgres_indexes == sqlite_indexes
    assert len(sqlite_columns) >= 9  # every table, not an empty comparison


async def test_replicas_opening_together_migrate_once(postgres_cluster: PostgresCluster) -> None:
    """Several `tofu-qemu api` replicas may start at once on a new database."""
    url = postgres_cluster.create_database()
    stores = await asyncio.gather(*(open_postgres(url) for _ in range(4)))
    for store in stores:
        await store.close()
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
