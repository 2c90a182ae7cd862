"""The `tofu-qemu` command's own decisions: refusing unsafe serving, hashing passwords."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from api.infra.credentials import load_credentials
from controller.cli import main


def test_refuses_public_listen_without_auth(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Serving a non-loopback address with no credentials stops with a reason."""
    for name in ("TOFU_QEMU_USERS", "TOFU_QEMU_TOKENS", "TOFU_QEMU_USERS_FILE", "TOFU_QEMU_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    code = main(["serve", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "refusing to serve 0.0.0.0:0 without authentication" in capsys.readouterr().err


def test_tls_needs_both_files(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A certificate without its key is a settings error, not a crash."""
    monkeypatch.setenv("TOFU_QEMU_USERS", "a:b")
    code = main(
        [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path),
            "--tls-cert",
            str(tmp_path / "c.pem"),
        ]
    )
    assert code == 2
    assert "TLS needs both" in capsys.readouterr().err


def test_client_certificate_logins_need_a_client_ca(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without a CA nothing says which certificates log in: refused, not served with auth off."""
    monkeypatch.setenv("TOFU_QEMU_TLS_CLIENT_CERT_USERS", "true")
    code = main(["serve", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "tls_client_cert_users needs --tls-client-ca" in capsys.readouterr().err


def test_invalid_setting_is_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A bad flag value names the setting."""
    assert main(["serve", "--history-limit", "zero", "--data-dir", str(tmp_path)]) == 2
    assert "history_limit" in capsys.readouterr().err


def test_hash_password_output_authenticates(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`hash-password --stdin` prints a hash that a users file accepts."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("correct horse\n"))
    assert main(["hash-password", "--stdin"]) == 0
    encoded = capsys.readouterr().out.strip()
    users_file = tmp_path / "users.toml"
    users_file.write_text(f'[users]\nalice = "{encoded}"\n')
    credentials = load_credentials(users=None, tokens=None, users_file=users_file)
    assert credentials.check_basic("alice", "correct horse") == "alice"


def test_boolean_settings_have_an_off_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting that defaults to true (metrics auth) can be turned off from the command line."""
    from controller.cli import _settings_from, build_parser

    monkeypatch.delenv("TOFU_QEMU_METRICS_AUTH", raising=False)
    monkeypatch.delenv("TOFU_QEMU_CONFIG", raising=False)
    for argv, expected in (
        (["api"], True),
        (["api", "--no-metrics-auth"], False),
        (["api", "--metrics-auth"], True),
    ):
        args = build_parser().parse_args(argv)
        assert _settings_from(args, args.model).metrics_auth is expected


def test_an_unusable_data_dir_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not a traceback: the data dir is named, and why it cannot be used."""
    monkeypatch.setenv("TOFU_QEMU_USERS", "a:b")
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["serve", "--listen", "127.0.0.1:0", "--data-dir", str(blocker / "data")])
    assert code == 2
    assert f"cannot create the data dir {blocker / 'data'}: Not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "api", "controller"])
def test_a_data_dir_others_can_write_stops_the_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str
) -> None:
    """Exit 2 with one line that says why and how to fix it, before anything is created; and the
    process's umask is 077, so what the server and its QEMUs create is private."""
    monkeypatch.setenv("TOFU_QEMU_USERS", "a:b")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o777)
    assert main([command, "--data-dir", str(data_dir)]) == 2
    assert f"refusing the data dir {data_dir}: mode 0777" in capsys.readouterr().err
    assert list(data_dir.iterdir()) == []
    assert os.umask(0o077) == 0o077
