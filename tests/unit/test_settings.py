"""Settings layering: flags over environment over config file over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from api.infra.settings import ProcessSettings, SettingsError, load_settings, path_fields
from api.settings import ServerSettings
from controller.layout import DataLayout
from controller.settings import ControllerSettings, ServeSettings

SETTINGS_CLASSES = (ProcessSettings, ServerSettings, ControllerSettings, ServeSettings)


def test_defaults() -> None:
    """With nothing given the documented defaults apply."""
    settings = load_settings(ServerSettings, flags={}, env={})
    assert settings.data_dir == Path.cwd() / ".tofu-qemu"
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.history_limit == 100
    assert settings.max_body_bytes == 64 * 1024 * 1024
    assert settings.lock_publish_after == 900
    assert settings.database_url is None  # SQLite in the data dir


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


def test_path_settings_are_known() -> None:
    """The path settings the tests below cover; a new one must be added here (and is then covered)."""
    assert path_fields(ServeSettings) == {
        "data_dir",
        "users_file",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "images_dir",
        "accel_cache",
    }
    assert all(path_fields(model) <= path_fields(ServeSettings) for model in SETTINGS_CLASSES)


def _relative_paths(model: type[BaseModel]) -> dict[str, str]:
    return {name: f"rel/{name}" for name in path_fields(model)}


@pytest.mark.parametrize("model", SETTINGS_CLASSES, ids=lambda model: model.__name__)
@pytest.mark.parametrize("source", ["flags", "env", "defaults"])
def test_relative_paths_become_absolute_from_the_working_directory(
    model: type[BaseModel], source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path from a flag, the environment or a default is taken from the current directory."""
    monkeypatch.chdir(tmp_path)
    given = _relative_paths(model)
    flags = given if source == "flags" else {}
    env = {f"TOFU_QEMU_{name.upper()}": value for name, value in given.items()} if source == "env" else {}
    settings = load_settings(model, flags=flags, env=env)
    for name in path_fields(model):
        value = getattr(settings, name)
        if source == "defaults":
            assert value is None or value == tmp_path / ".tofu-qemu", name
        else:
            assert value == tmp_path / "rel" / name, name


@pytest.mark.parametrize("model", SETTINGS_CLASSES, ids=lambda model: model.__name__)
def test_relative_paths_in_the_config_file_are_taken_from_its_directory(
    model: type[BaseModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config file means the same wherever the server starts: its paths are relative to itself."""
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "tofu-qemu.toml"
    config.write_text("".join(f'{name} = "{value}"\n' for name, value in _relative_paths(model).items()))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    # The config file's own path is relative here, and taken from the current directory.
    settings = load_settings(model, flags={}, env={"TOFU_QEMU_CONFIG": "../etc/tofu-qemu.toml"})
    for name in path_fields(model):
        assert getattr(settings, name) == tmp_path / "etc" / "rel" / name, name


def test_absolute_and_home_paths_in_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An absolute path is kept as written (folded), `~` is the user's home."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path}/a/../data"\nimages_dir = "~/images"\n')
    settings = load_settings(ControllerSettings, flags={}, env={}, config_file=config)
    assert settings.data_dir == tmp_path / "data"
    assert settings.images_dir == tmp_path / "home" / "images"


@pytest.mark.parametrize("model", SETTINGS_CLASSES, ids=lambda model: model.__name__)
def test_settings_built_directly_are_absolute_too(model: type[BaseModel]) -> None:
    """The validator sits on the model, so code that builds settings itself cannot skip it."""
    settings = model.model_validate(_relative_paths(model))
    assert all(getattr(settings, name).is_absolute() for name in path_fields(model))


def test_the_data_layout_refuses_relative_paths(tmp_path: Path) -> None:
    """The last line of defence before paths reach QEMU's argv."""
    with pytest.raises(ValueError, match="not an absolute path"):
        DataLayout(Path(".tofu-qemu"), tmp_path)
    with pytest.raises(ValueError, match="not an absolute path"):
        DataLayout(tmp_path, Path("images"))


def test_client_certificates_are_not_logins_by_default() -> None:
    """tls_client_cert_users is opt-in: mTLS next to passwords stays a second factor."""
    assert load_settings(ServerSettings, flags={}, env={}).tls_client_cert_users is False
    enabled = load_settings(ServerSettings, flags={}, env={"TOFU_QEMU_TLS_CLIENT_CERT_USERS": "true"})
    assert enabled.tls_client_cert_users is True


@pytest.mark.parametrize(
    "url", ["postgresql://tofu@db.internal/tofu", "postgres:///tofu?host=/run/postgresql"]
)
def test_database_url_accepts_postgresql(url: str) -> None:
    settings = load_settings(ServerSettings, flags={}, env={"TOFU_QEMU_DATABASE_URL": url})
    assert settings.database_url == url


@pytest.mark.parametrize("url", ["sqlite:///tmp/x.db", "mysql://u:secret@h/db", "db.internal:5432"])
def test_database_url_refuses_other_engines_without_echoing_the_url(url: str) -> None:
    """The URL may carry a password: the error names what is accepted, not what was given."""
    with pytest.raises(SettingsError, match="postgresql://") as refused:
        load_settings(ServerSettings, flags={"database_url": url}, env={})
    assert "secret" not in str(refused.value)
