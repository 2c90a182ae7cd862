"""Settings layering: flags over environment over config file over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.settings import ServerSettings, SettingsError, load_settings


def test_defaults() -> None:
    """With nothing given the documented defaults apply."""
    settings = load_settings(ServerSettings, flags={}, env={})
    assert settings.data_dir == Path(".tofu-qemu")
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.history_limit == 100
    assert settings.max_body_bytes == 64 * 1024 * 1024
    assert settings.lock_publish_after == 900


def test_precedence(tmp_path: Path) -> None:
    """A flag beats the environment, which beats the config file."""
    config = tmp_path / "tofu-qemu.toml"
    config.write_text('history-limit = 5\nlisten = "127.0.0.1:9000"\nstrict_lineage = true\n')
    settings = load_settings(
        ServerSettings,
        flags={"history_limit": "7", "listen": None},
        env={
            "TOFU_QEMU_CONFIG": str(config),
            "TOFU_QEMU_HISTORY_LIMIT": "6",
            "TOFU_QEMU_LISTEN": "[::1]:9001",
        },
    )
    assert settings.history_limit == 7
    assert (settings.host, settings.port) == ("::1", 9001)
    assert settings.strict_lineage is True


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("localhost:1", True),
        ("[::1]:1", True),
        ("0.0.0.0:1", False),
        ("example:1", False),
    ],
)
def test_loopback_detection(listen: str, loopback: bool) -> None:
    """Only loopback addresses may serve without auth."""
    assert load_settings(ServerSettings, flags={"listen": listen}, env={}).is_loopback is loopback


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param({"listen": "8080"}, "HOST:PORT", id="listen-no-host"),
        pytest.param({"history_limit": "0"}, "history_limit", id="history-zero"),
        pytest.param({"max_body_bytes": "lots"}, "max_body_bytes", id="not-a-number"),
    ],
)
def test_invalid_values_are_reported(flags: dict[str, str], message: str) -> None:
    """An invalid setting stops start-up and names the setting."""
    with pytest.raises(SettingsError, match=message):
        load_settings(ServerSettings, flags=flags, env={})


def test_unknown_config_key(tmp_path: Path) -> None:
    """A typo in the config file is an error, not silently ignored."""
    config = tmp_path / "c.toml"
    config.write_text("histroy_limit = 5\n")
    with pytest.raises(SettingsError, match="unknown settings histroy_limit"):
        load_settings(ServerSettings, flags={}, env={}, config_file=config)
