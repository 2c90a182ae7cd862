"""docs/security.md "Limits": the numbers there that no other test pins.

The rest are pinned beside the code they bound: test_connection_limits.py::test_documented_limits,
test_stream_limits.py, test_throttle.py::test_the_documented_limits,
test_image_egress.py::test_download_settings_defaults, test_admission_hosts.py::
test_admission_settings_defaults, test_source_resilience.py::test_retry_delays_are_documented,
test_settings.py::test_defaults.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api import tfstate
from api.infra.settings import load_settings
from api.server import auth, console, watch
from api.store import lock_info
from api.types import QemuVMSpec
from controller import image_gc, plan
from controller.images import download
from controller.settings import ControllerSettings

KIB = 1024


def test_body_and_manifest_limits() -> None:
    assert (lock_info.LOCK_INFO_MAX_BYTES, lock_info.LOCK_INFO_DEPTH_MAX) == (64 * KIB, 8)
    assert (tfstate.MANIFEST_MAX_BYTES, tfstate.MANIFEST_DEPTH_MAX) == (64 * KIB, 16)
    assert (tfstate.DECLARE_CACHE_SIZE, tfstate.CACHED_MANIFEST_MAX_BYTES) == (16_384, 4 * KIB)


def test_authentication_limits() -> None:
    assert (auth.AUTH_WORKERS, auth.AUTH_PENDING_MAX, auth.BUSY_RETRY_AFTER_SECONDS) == (2, 64, 1)
    assert auth.THROTTLE_KEYS_MAX == 10_000
    assert (auth.VERIFIED_MAX, auth.VERIFIED_TTL_SECONDS) == (1024, 300.0)
    assert (auth.IPV6_CLIENT_PREFIX, auth.USER_LOGGED_CHARS) == (64, 64)


def test_stream_lengths() -> None:
    assert (watch.WATCH_TIMEOUT_DEFAULT, watch.WATCH_TIMEOUT_MAX) == (1800, 3600)
    assert console.FOLLOW_TIMEOUT_MAX == 86_400


def test_image_and_host_limits() -> None:
    assert download.SIDECAR_MAX_BYTES == 64 * KIB
    assert image_gc.GC_PERIOD_SECONDS == 600.0
    assert plan.ADMISSION_RECHECK.total_seconds() == 5.0
    settings = load_settings(ControllerSettings, flags={}, env={})
    assert settings.image_cache_grace_seconds == 86_400.0
    assert settings.port_range == "20000-29999"
    assert settings.memory_reserve_mib == 256
    assert (settings.max_vms, settings.max_memory_mib, settings.max_vcpus, settings.max_disk_gib) == (
        None,
        None,
        None,
        None,
    )


@pytest.mark.parametrize(("port", "valid"), [(1023, False), (1024, True), (65535, True)])
def test_the_api_takes_host_ports_from_1024(port: int, valid: bool) -> None:
    spec = {"boot": {"kernel": "k"}, "network": {"forwards": [{"guestPort": 80, "hostPort": port}]}}
    if valid:
        QemuVMSpec.model_validate(spec)
    else:
        with pytest.raises(ValidationError, match="hostPort"):
            QemuVMSpec.model_validate(spec)
