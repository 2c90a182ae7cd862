"""Host identity and lease settings (docs/multi-host.md): their defaults and what is refused."""

from __future__ import annotations

import socket

import pytest

from api.hosts import HOST_NAME_MAX, host_name_problem, parse_host_labels
from api.infra.settings import SettingsError, load_settings
from controller.host_agent import RENEWALS_PER_LEASE, SCHEDULER_POLL_SECONDS
from controller.settings import ControllerSettings, ServeSettings, default_host_name
from controller.sources import STORE_POLL_SECONDS


def test_the_documented_defaults() -> None:
    settings = load_settings(ControllerSettings, flags={}, env={})
    assert settings.host_lease_seconds == 15.0
    assert settings.host_lost_grace_seconds == 30.0
    assert settings.labels == {}
    assert settings.resolved_host_name == default_host_name()
    assert default_host_name().startswith(socket.gethostname().lower().split(".")[0])


def test_name_and_labels_come_from_flags_or_environment() -> None:
    env = {"TOFU_QEMU_HOST_NAME": "rack1-node2", "TOFU_QEMU_HOST_LABELS": "zone=eu, disk=ssd"}
    settings = load_settings(ServeSettings, flags={}, env=env)
    assert settings.resolved_host_name == "rack1-node2"
    assert settings.labels == {"zone": "eu", "disk": "ssd"}
    flagged = load_settings(ServeSettings, flags={"host_name": "db.lab.example"}, env=env)
    assert flagged.resolved_host_name == "db.lab.example"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"host_name": "Not A Name"}, "host_name"),
        ({"host_name": "a/../b"}, "host_name"),
        ({"host_labels": "zone"}, "must be KEY=VALUE"),
        ({"host_labels": "bad key=x"}, "host label"),
        ({"host_lease_seconds": "0"}, "host_lease_seconds"),
    ],
)
def test_bad_values_are_refused(flags: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(ControllerSettings, flags=flags, env={})


def test_at_most_64_host_labels() -> None:
    with pytest.raises(ValueError, match="at most 64"):
        parse_host_labels(",".join(f"k{i}=v" for i in range(65)))


def test_the_documented_periods_and_limits() -> None:
    """docs/multi-host.md: renewed every third of the lease; the scheduler and the store watch
    see other processes' commits within 1 s; host names up to 253 characters."""
    assert RENEWALS_PER_LEASE == 3
    assert SCHEDULER_POLL_SECONDS == STORE_POLL_SECONDS == 1.0
    assert HOST_NAME_MAX == 253
    longest = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(longest) == 253
    assert host_name_problem(longest) is None
    assert host_name_problem(longest + "b") is not None
