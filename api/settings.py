"""Server settings, layered: command-line flags, then TOFU_QEMU_* environment, then a TOML file.

Every setting has one name used in all three places: `--history-limit`, `TOFU_QEMU_HISTORY_LIMIT`,
`history_limit = 100`. Unknown keys in the file are an error, not silently ignored.

Every path setting is made absolute here, once, so nothing downstream ever sees a relative path
(QEMU runs with a VM's runtime dir as its working directory, where a relative path points
nowhere). A relative path given as a flag or in the environment is taken from the current
directory; one written in the config file is taken from the config file's own directory, so a
config file means the same thing wherever the server is started from. `~` is expanded.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from api.instancetypes import COMMON_INSTANCE_TYPES, cluster_types, cluster_types_from_text
from api.store.urls import check_database_url
from api.tracelinks import check_trace_url_template
from api.types import CLUSTER_INSTANCE_TYPE_KIND, CLUSTER_PREFERENCE_KIND, describe_validation_error

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
    # retention; whichever runs prunes it.
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


class ServerSettings(ProcessSettings):
    """Everything `tofu-qemu api` reads. Defaults suit a laptop quick start."""

    listen: str = Field(default="127.0.0.1:8080", description="HOST:PORT to serve on")
    users: str | None = Field(default=None, description="name:password[,name:password] (quick starts)")
    users_file: Path | None = Field(default=None, description="TOML file of salted password hashes")
    tokens: str | None = Field(default=None, description="Bearer tokens, comma-separated")
    insecure_no_auth: bool = Field(
        default=False, description="Allow serving a non-loopback address without auth"
    )
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = Field(
        default=None, description="Require client certificates signed by this CA"
    )
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="Larger bodies get 413")
    history_limit: int = Field(default=100, ge=1, description="State versions kept per project")
    strict_lineage: bool = Field(
        default=False, description="Refuse writes whose lineage or serial do not follow"
    )
    lock_publish_after: float = Field(
        default=900.0, gt=0, description="Seconds a lock may be held before its writes are published anyway"
    )
    metrics_auth: bool = Field(default=True, description="Require auth for GET /metrics")
    # netguard: connection limits, the Host check and stream limits (docs/operations.md
    # "Connections and streams", api/server/connections.py, hosts.py, streams.py).
    max_connections: int = Field(
        default=1024, ge=1, description="Open HTTP connections at most (and at most half the open-file limit)"
    )
    header_timeout_seconds: float = Field(
        default=10.0, gt=0, description="A new connection must send its first request header within this"
    )
    keepalive_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="An idle connection, or one slow to send its next request, is closed after this",
    )
    body_timeout_seconds: float = Field(
        default=60.0, gt=0, description="A request body must have arrived within this (else 408)"
    )
    allowed_hosts: str | None = Field(
        default=None,
        description="Host names requests may name besides localhost, IP addresses and the listen host "
        "(comma-separated; *.example.com for subdomains; * for any)",
    )
    max_watches: int = Field(default=100, ge=1, description="Watch streams open at once, in all")
    max_watches_per_principal: int = Field(
        default=50, ge=1, description="Watch streams open at once per authenticated user or token"
    )
    max_follows: int = Field(default=32, ge=1, description="Console follows open at once, in all")
    max_follows_per_principal: int = Field(
        default=16, ge=1, description="Console follows open at once per authenticated user or token"
    )
    watch_bookmark_seconds: float = Field(
        default=15.0,
        gt=0,
        description="How often an idle watch gets a BOOKMARK (keeps proxies from timing out)",
    )
    follow_timeout_seconds: int = Field(
        default=3600, ge=1, le=86400, description="How long a console follow lasts without timeoutSeconds"
    )

    # kubectl and client-go (docs/kubectl.md): a client certificate as a login.
    tls_client_cert_users: bool = Field(
        default=False,
        description="With tls_client_ca: a verified client certificate logs in as its subject CN",
    )

    # tracelinks: every trace id in events, `describe` and the dashboard becomes a link
    # (api/tracelinks.py, docs/observability.md "Trace links").
    trace_url_template: str | None = Field(
        default=None,
        description="Link trace ids to this URL, e.g. http://jaeger:16686/trace/{trace_id} "
        "(http(s), {trace_id} its only placeholder)",
    )

    @field_validator("trace_url_template")
    @classmethod
    def _valid_trace_url_template(cls, value: str | None) -> str | None:
        return None if value is None else check_trace_url_template(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _valid_allowed_hosts(cls, value: str | None) -> str | None:
        if value is not None:
            parse_allowed_hosts(value)
        return value

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def is_loopback(self) -> bool:
        host = self.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_allowed_hosts(text: str) -> frozenset[str]:
    """Lower-cased host names from "a.example, *.lab.example, *". :raise ValueError: an entry
    with a port, a scheme or a space (names only: any port is accepted)."""
    names = frozenset(entry.strip().lower().rstrip(".") for entry in text.split(",") if entry.strip())
    for name in names:
        bare = name.removeprefix("*.")
        if name != "*" and (not bare or any(char in bare for char in ":/ *[]@")):
            raise ValueError(f"allowed host {name!r} must be a host name, *.SUFFIX or * (no port or scheme)")
    return names


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
