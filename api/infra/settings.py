"""The settings base every tofu-qemu process shares, and how settings are layered: command-line
flags, then TOFU_QEMU_* environment, then a TOML file.

Every setting has one name used in all three places: `--history-limit`, `TOFU_QEMU_HISTORY_LIMIT`,
`history_limit = 100`. Unknown keys in the file are an error, not silently ignored.

Every path setting is made absolute here, once, so nothing downstream ever sees a relative path
(QEMU runs with a VM's runtime dir as its working directory, where a relative path points
nowhere). A relative path given as a flag or in the environment is taken from the current
directory; one written in the config file is taken from the config file's own directory, so a
config file means the same thing wherever the server is started from. `~` is expanded.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from api.instancetypes import COMMON_INSTANCE_TYPES, cluster_types, cluster_types_from_text
from api.spec_fields import CLUSTER_INSTANCE_TYPE_KIND, CLUSTER_PREFERENCE_KIND, describe_validation_error
from api.store.urls import check_database_url

ENV_PREFIX = "TOFU_QEMU_"
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"


class SettingsError(ValueError):
    """Settings that cannot work; the message says which and why."""


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class ProcessSettings(BaseModel):
    """What every tofu-qemu process reads: where the store is, how it logs and traces."""

    # validate_default: the default data dir goes through the path validator below too.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    data_dir: Path = Field(default=Path(".tofu-qemu"), description="Where the SQLite store lives")
    otlp_endpoint: str | None = Field(
        default=None, description="Export traces over OTLP to this base URL (shorthand for OTEL_* settings)"
    )
    log_format: LogFormat = LogFormat.AUTO
    log_level: str = "info"
    # Both the API (its own events) and the controller write the event log, so both know its
    # retention; the process holding the store prunes it (controller/event_pruner.py).
    events_per_vm: int = Field(default=200, ge=1, description="Events kept per VM (the newest)")
    events_max_age_hours: float = Field(default=168.0, gt=0, description="Events older than this are removed")
    # PostgreSQL store (docs/postgres.md): every table on a PostgreSQL server instead of SQLite in
    # the data dir. Runtime dirs, disks and images stay in the data dir.
    database_url: str | None = Field(
        default=None,
        description="postgresql://... URL of the store (default: SQLite in the data dir)",
    )

    # instancetypes: cluster-wide instance types and preferences, `[instance_types.NAME]` and
    # `[preferences.NAME]` tables of the config file (docs/instancetypes.md). The shipped
    # u1.small, u1.medium and u1.large are always there unless a table of the same name replaces one.
    instance_types: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Cluster-wide instance types (QemuClusterInstanceType), by name"
    )
    preferences: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Cluster-wide preferences (QemuClusterPreference), by name"
    )

    @field_validator("instance_types", "preferences", mode="before")
    @classmethod
    def _types_from_json(cls, value: Any) -> Any:
        # The environment gives a string: TOFU_QEMU_INSTANCE_TYPES='{"big": {"cpus": 8, ...}}'.
        return cluster_types_from_text(value) if isinstance(value, str) else value

    @field_validator("instance_types")
    @classmethod
    def _valid_instance_types(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return cluster_types(CLUSTER_INSTANCE_TYPE_KIND, {**COMMON_INSTANCE_TYPES, **value})

    @field_validator("preferences")
    @classmethod
    def _valid_preferences(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return cluster_types(CLUSTER_PREFERENCE_KIND, value)

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        return None if value is None else check_database_url(value)

    @property
    def events_max_age(self) -> timedelta:
        return timedelta(hours=self.events_max_age_hours)

    @field_validator("*")
    @classmethod
    def _absolute_paths(cls, value: Any) -> Any:
        # "*" covers the Path fields of every subclass too, present and future.
        return absolute_path(value) if isinstance(value, Path) else value


def absolute_path(path: Path) -> Path:
    """`path` with `~` expanded, made absolute against the current directory, `..` folded."""
    return Path(os.path.abspath(path.expanduser()))


def path_fields(model: type[BaseModel]) -> frozenset[str]:
    """The settings of `model` that hold a filesystem path."""
    return frozenset(
        name
        for name, field in model.model_fields.items()
        if field.annotation is Path or Path in get_args(field.annotation)
    )


def split_listen(listen: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[V6]:PORT". :raise ValueError: on anything else."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {listen!r} must be HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port_text)


SettingsT = TypeVar("SettingsT", bound=BaseModel)


def load_settings(
    model: type[SettingsT],
    *,
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    config_file: Path | None = None,
) -> SettingsT:
    """Merge defaults < config file < environment < flags and validate the result.

    `flags` holds only the options given on the command line (None means "not given").
    The config file is `config_file`, else $TOFU_QEMU_CONFIG, else none. Relative paths in it are
    taken from its own directory; relative paths anywhere else from the current directory.

    :raise SettingsError: unreadable file, unknown key, or an invalid value.
    """
    fields = set(model.model_fields)
    merged: dict[str, Any] = {}
    path = config_file or (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    if path is not None:
        merged.update(_read_config_file(absolute_path(path), model))
    for name in fields:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None:
            merged[name] = value
    merged.update({name: value for name, value in flags.items() if value is not None and name in fields})
    try:
        return model.model_validate(merged)
    except ValidationError as err:
        raise SettingsError(f"invalid settings: {describe_validation_error(err)}") from err


def _read_config_file(path: Path, model: type[BaseModel]) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SettingsError(f"cannot read config file {path}: {err}") from err
    values = {key.replace("-", "_"): value for key, value in document.items()}
    unknown = sorted(set(values) - set(model.model_fields))
    if unknown:
        raise SettingsError(f"config file {path}: unknown settings {', '.join(unknown)}")
    for name in path_fields(model) & set(values):
        if isinstance(values[name], str):
            values[name] = path.parent / Path(values[name]).expanduser()
    return values
