"""Settings of the HTTP API (`tofu-qemu api`, and `serve` with the controller's).

The base every process shares, and how flags, environment and a config file are layered, live in
api/infra/settings.py.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator

from api.infra.settings import ProcessSettings, split_listen
from api.tracelinks import check_trace_url_template


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

    # The interactive console (api/server/console_ws.py, docs/console.md).
    max_consoles: int = Field(default=16, ge=1, description="Interactive console sessions open at once")
    max_consoles_per_principal: int = Field(
        default=4, ge=1, description="Interactive console sessions open at once per user or token"
    )
    console_idle_seconds: int = Field(
        default=900,
        ge=10,
        le=86400,
        description="An interactive console's writer is detached after this long without a keystroke",
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
