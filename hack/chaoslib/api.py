"""The host's HTTP API as the tool sees it: the http backend's /state and the VM objects."""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from typing import Any

from _common import (
    http_request,
    project_vms,
)

from chaoslib.basics import HTTP_TIMEOUT_S, ChaosError


class Api:
    """The host's HTTP API: the http backend's /state and the VM objects."""

    def __init__(self, base_url: str, *, authorization: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self._authorization = authorization

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request; any status is an answer. :raise OSError: no answer (transport, timeout)."""
        # The URL is the operator's --server (or our own loopback server), never remote input.
        return http_request(
            method, self.base_url + path, body, authorization=self._authorization, timeout=HTTP_TIMEOUT_S
        )

    def vms(self, project: str) -> list[dict[str, Any]]:
        """:raise OSError: no answer. :raise ChaosError: an error status."""
        return project_vms(self.request, project, ChaosError)

    def state(self, project: str) -> bytes | None:
        """The project's current state, or None if it has none."""
        status, body = self.request("GET", f"/state/{project}")
        if status in (204, 404):
            return None
        if status != 200:
            raise ChaosError(f"GET /state/{project}: {status} {body[:300]!r}")
        return body

    def post_state(self, project: str, body: bytes) -> None:
        status, answer = self.request("POST", f"/state/{project}", body)
        if status != 200:
            raise ChaosError(f"POST /state/{project}: {status} {answer[:300]!r}")


def authorization_from_env() -> str | None:
    token = os.environ.get("TOFU_QEMU_TOKEN")
    if token:
        return f"Bearer {token}"
    user, password = os.environ.get("TOFU_QEMU_USERNAME"), os.environ.get("TOFU_QEMU_PASSWORD")
    if user and password is not None:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return None


def phase_of(vm: Mapping[str, Any]) -> str:
    return str((vm.get("status") or {}).get("phase", "Pending"))


def pid_of(vm: Mapping[str, Any]) -> int | None:
    pid = (vm.get("status") or {}).get("pid")
    return int(pid) if pid is not None else None


def restarts_of(vm: Mapping[str, Any]) -> int:
    return int((vm.get("status") or {}).get("restarts", 0))


def ready_message(vm: Mapping[str, Any]) -> str:
    for condition in (vm.get("status") or {}).get("conditions", ()):
        if condition.get("type") == "Ready":
            return f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
    return ""
