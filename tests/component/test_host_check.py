"""DNS rebinding (issue 15 M5): only configured host names are answered, with or without
credentials, on every route including the probes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.infra.credentials import Credentials, load_credentials
from api.infra.metrics import Metrics
from api.infra.settings import SettingsError, load_settings
from api.server import create_app
from api.server.hosts import DEFAULT_HOSTS, allowed_host_names, host_problem
from api.server.ops import create_ops_app
from api.settings import ServerSettings, parse_allowed_hosts
from api.store import Database
from tests.component.conftest import AUTH, ClientFactory

LOOPBACK_ONLY = allowed_host_names("127.0.0.1", frozenset())


def test_the_default_names_are_documented() -> None:
    """docs/security.md: localhost, every IP address, and the listen host's name."""
    assert frozenset({"localhost"}) == DEFAULT_HOSTS
    assert allowed_host_names("myhost.lan", frozenset()) == {"localhost", "myhost.lan"}
    assert allowed_host_names("0.0.0.0", frozenset())  # noqa: S104 (a wildcard names no host) == {"localhost"}


@pytest.mark.parametrize(
    "host",
    [
        None,
        "localhost",
        "localhost:8080",
        "LOCALHOST.:8080",
        "127.0.0.1",
        "127.0.0.1:8080",
        "[::1]:8080",
        "::1",
        "10.1.2.3:80",
        "[fd00::5]",
    ],
)
def test_loopback_names_and_addresses_are_answered(host: str | None) -> None:
    assert host_problem(host, LOOPBACK_ONLY) is None


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8080",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "[::1",
        "lab.example",
    ],
)
def test_other_names_are_refused(host: str) -> None:
    problem = host_problem(host, LOOPBACK_ONLY)
    assert problem is not None
    assert "DNS rebinding" in problem
    assert "allowed_hosts" in problem


@pytest.mark.parametrize(
    ("allowed", "host", "answered"),
    [
        ("lab.example", "lab.example:8080", True),
        ("lab.example", "evil.example", False),
        ("*.lab.example", "vm.lab.example", True),
        ("*.lab.example", "lab.example", False),
        ("*.lab.example", "evillab.example", False),
        ("*", "anything.example", True),
        ("Lab.Example.", "lab.example", True),
    ],
)
def test_allowed_hosts(allowed: str, host: str, answered: bool) -> None:
    names = allowed_host_names("127.0.0.1", parse_allowed_hosts(allowed))
    assert (host_problem(host, names) is None) is answered


@pytest.mark.parametrize("bad", ["lab.example:8080", "http://lab.example", "a b", "*.*.example", "[::1]"])
def test_allowed_hosts_are_names_only(bad: str) -> None:
    with pytest.raises(SettingsError, match="allowed host"):
        load_settings(ServerSettings, flags={"allowed_hosts": bad}, env={})


async def _client(aiohttp_client: ClientFactory, tmp_path: Path, **kwargs: Any) -> TestClient[Any, Any]:
    settings = ServerSettings(data_dir=tmp_path / "data", **kwargs)
    credentials = kwargs.pop("credentials", None) or Credentials()
    return await aiohttp_client(create_app(settings, credentials=credentials))


async def test_a_foreign_host_is_refused_without_credentials(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """The loopback quick start: a rebound page (Host: evil.example) reads nothing."""
    client = await _client(aiohttp_client, tmp_path)
    for path in ("/api/v1/vms", "/healthz", "/metrics", "/ui"):
        answer = await client.get(path, headers={"Host": "evil.example:8080"})
        body = await answer.json()
        assert (answer.status, body["kind"], body["code"]) == (403, "Status", 403), path
        assert "evil.example:8080" in body["message"]
        assert "allowed_hosts" in body["message"]
    assert (await client.get("/api/v1/vms", headers={"Host": "localhost:8080"})).status == 200
    assert (await client.get("/api/v1/vms")).status == 200  # 127.0.0.1:PORT


async def test_a_foreign_host_is_refused_with_credentials_too(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    settings = ServerSettings(data_dir=tmp_path / "data")
    credentials = load_credentials(users="alice:s3cret", tokens=None, users_file=None)
    client = await aiohttp_client(create_app(settings, credentials=credentials))
    refused = await client.get("/api/v1/vms", headers={**AUTH, "Host": "evil.example"})
    assert refused.status == 403
    assert (await client.get("/healthz", headers={"Host": "evil.example"})).status == 403
    assert (await client.get("/api/v1/vms", headers=AUTH)).status == 200


async def test_allowed_hosts_lets_a_name_in(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await _client(aiohttp_client, tmp_path, allowed_hosts="tofu.lab.example")
    assert (await client.get("/api/v1/vms", headers={"Host": "tofu.lab.example:8080"})).status == 200
    assert (await client.get("/api/v1/vms", headers={"Host": "other.lab.example"})).status == 403


async def test_the_ops_listener_checks_the_host_too(aiohttp_client: ClientFactory, db: Database) -> None:
    """`tofu-qemu controller`'s probes and metrics: the same defaults, plus its listen host."""
    app = create_ops_app(
        metrics=Metrics(), database=db, credentials=Credentials(), metrics_auth=False, listen_host="ops.lab"
    )
    client = await aiohttp_client(app)
    assert (await client.get("/healthz", headers={"Host": "evil.example"})).status == 403
    assert (await client.get("/metrics", headers={"Host": "evil.example"})).status == 403
    assert (await client.get("/healthz", headers={"Host": "ops.lab:8081"})).status == 200
    assert (await client.get("/healthz")).status == 200
