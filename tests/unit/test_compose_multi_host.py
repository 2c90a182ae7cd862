"""hack/deploy/compose-multi-host.yaml, read as compose reads it (YAML anchors and merge keys),
without a container engine: every setting it passes is one the command reads (a misspelt
TOFU_QEMU_* variable would be ignored silently), and the two controllers are two distinct hosts
on one store. `podman-compose config` accepts the file too (docs/multi-host.md); no image was
run here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.infra.settings import ENV_PREFIX, load_settings
from api.settings import ServerSettings
from api.store.urls import check_database_url
from controller.settings import ControllerSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "hack" / "deploy" / "compose-multi-host.yaml"
MODELS: dict[str, type[ServerSettings] | type[ControllerSettings]] = {
    "api": ServerSettings,
    "controller": ControllerSettings,
}
# What the environment variables the file requires stand for in this test.
REQUIRED = {"TOFU_QEMU_USERS": "alice:secret", "POSTGRES_PASSWORD": "pw", "KVM_GID": "108"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return dict(document["services"])


def tofu_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in services.items() if "command" in service}


def environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment with ${VAR...} replaced by REQUIRED's values."""
    return {
        key: _VARIABLE.sub(lambda match: REQUIRED[match.group(1)], str(value))
        for key, value in service["environment"].items()
    }


def image_environment() -> dict[str, str]:
    """The Dockerfile's ENV: every container of the image starts with it."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    block = text[text.index("ENV PATH=") : text.index("VOLUME")]
    return dict(re.findall(r"(TOFU_QEMU_\w+)=(\S+)", block))


def test_one_api_and_two_controllers_on_one_postgres(services: dict[str, dict[str, Any]]) -> None:
    commands = {name: service["command"] for name, service in tofu_services(services).items()}
    assert commands == {"api": ["api"], "controller-a": ["controller"], "controller-b": ["controller"]}
    assert services["postgres"]["image"].startswith("docker.io/library/postgres:")
    assert "ports" not in services["postgres"], "PostgreSQL is reached over the compose network only"
    for name, service in tofu_services(services).items():
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name


def test_every_setting_is_read_by_its_command(services: dict[str, dict[str, Any]]) -> None:
    for name, service in tofu_services(services).items():
        model = MODELS[service["command"][0]]
        env = environment(service)
        for key in env:
            if key.startswith(ENV_PREFIX):
                assert key[len(ENV_PREFIX) :].lower() in model.model_fields, f"{name}: {key} is no setting"
        settings = load_settings(model, flags={}, env={**image_environment(), **env})
        assert settings.database_url is not None
        check_database_url(settings.database_url)
        # The password reaches libpq through PGPASSWORD, never through the URL.
        assert "@" in settings.database_url
        assert ":" not in settings.database_url.split("//", 1)[1].split("@", 1)[0], name
        assert env["PGPASSWORD"] == REQUIRED["POSTGRES_PASSWORD"]


def test_two_hosts_with_their_own_data_and_ports(
    services: dict[str, dict[str, Any]],
) -> None:
    controllers = {name: s for name, s in services.items() if s.get("command") == ["controller"]}
    settings = {
        name: load_settings(ControllerSettings, flags={}, env={**image_environment(), **environment(s)})
        for name, s in controllers.items()
    }
    assert sorted(s.resolved_host_name for s in settings.values()) == ["host-a", "host-b"]
    ranges = {}
    for name, service in controllers.items():
        low, high = map(int, settings[name].port_range.split("-"))
        ranges[name] = set(range(low, high + 1))
        # Published as is, on loopback: the VMs' forwards are reachable at the port status names.
        assert service["ports"] == [f"127.0.0.1:{low}-{high}:{low}-{high}"], name
        assert service["devices"] == ["/dev/kvm"], name
        assert service["stop_grace_period"] == "90s"
        assert "8081/readyz" in " ".join(service["healthcheck"]["test"]), name
    assert not ranges["controller-a"] & ranges["controller-b"]
    volumes = [service["volumes"][0].split(":")[0] for service in tofu_services(services).values()]
    assert len(set(volumes)) == len(volumes), "each process has a data dir of its own"
