"""The command line with --database-url: backup and restore refuse and name PostgreSQL's tools;
serve, api and controller take the flag and its environment variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controller.cli import EXIT_USAGE, build_parser, main

URL = "postgresql://tofu@127.0.0.1:1/tofu"


@pytest.mark.parametrize(("command", "tool"), [("backup", "pg_dump"), ("restore", "pg_restore")])
def test_backup_and_restore_refuse_a_postgres_store(
    command: str, tool: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "store.backup"
    file.write_bytes(b"")
    argv = [command, str(file), "--data-dir", str(tmp_path / "data"), "--database-url", URL]
    assert main(argv) == EXIT_USAGE
    error = capsys.readouterr().err
    assert tool in error
    assert "PostgreSQL" in error
    assert "docs/postgres.md" in error
    assert error.count("\n") == 1


def test_the_environment_variable_selects_postgres_for_backup_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOFU_QEMU_DATABASE_URL", URL)
    assert main(["backup", str(tmp_path / "f"), "--data-dir", str(tmp_path / "data")]) == EXIT_USAGE
    assert "pg_dump" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "api", "controller"])
def test_server_commands_take_database_url(command: str) -> None:
    args = build_parser().parse_args([command, "--database-url", URL])
    assert args.database_url == URL


@pytest.mark.parametrize("command", ["api", "controller"])
def test_an_unreachable_database_at_start_exits_with_a_clear_error(command: str, tmp_path: Path) -> None:
    """Nothing listens on port 1 of loopback: refused at once, no traceback. (A process of its
    own: serving instruments aiohttp for the whole process.)"""
    tofu_qemu = Path(sys.executable).parent / "tofu-qemu"
    argv = [str(tofu_qemu), command, "--data-dir", str(tmp_path / "data"), "--database-url", URL]
    argv += ["--listen", "127.0.0.1:0"] if command == "api" else ["--ops-listen", "127.0.0.1:0"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "PostgreSQL server cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr
