"""`tofu-qemu describe vm` shows what the guest agent reports, with the guest's own strings
made printable first (a host name with a terminal escape must not reach the operator's tty)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from api.client.describe import describe_vm
from api.types import QemuVMStatus

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
VM: dict[str, Any] = {
    "metadata": {
        "name": "web",
        "project": "p",
        "uid": "u-1",
        "generation": 1,
        "creationTimestamp": "2026-01-01T11:00:00+00:00",
    },
    "spec": {"guestAgent": True},
    "status": {"phase": "Running", "observedGeneration": 1},
}
GUEST = {
    "agentConnected": True,
    "osInfo": {"prettyName": "tofu-qemu tiny guest", "kernelRelease": "6.1.0-50-cloud-amd64"},
    "hostname": "web",
    "interfaces": [
        {"name": "lo", "mac": "00:00:00:00:00:00", "addresses": ["127.0.0.1/8", "::1/128"]},
        {"name": "eth0", "mac": "52:54:00:12:34:56", "addresses": ["10.0.2.15/24"]},
    ],
}


def describe_with(guest: dict[str, Any] | None) -> str:
    vm = copy.deepcopy(VM)
    if guest is not None:
        vm["status"]["guest"] = QemuVMStatus.model_validate({"guest": guest}).model_dump(
            mode="json", by_alias=True
        )["guest"]
    return describe_vm(vm, [], NOW)


def test_describe_shows_the_guest_section() -> None:
    text = describe_with(GUEST)
    section = text[text.index("Guest:") : text.index("Conditions:")]
    assert section.splitlines() == [
        "Guest:",
        "  Agent:        connected",
        "  OS:           tofu-qemu tiny guest (kernel 6.1.0-50-cloud-amd64)",
        "  Hostname:     web",
        "  Interfaces:",
        "    NAME   MAC                 ADDRESSES",
        "    lo     00:00:00:00:00:00   127.0.0.1/8, ::1/128",
        "    eth0   52:54:00:12:34:56   10.0.2.15/24",
    ]


def test_a_vm_without_an_agent_has_no_guest_section() -> None:
    assert "Guest:" not in describe_with(None)


def test_control_characters_from_the_guest_never_reach_the_terminal() -> None:
    text = describe_with({**GUEST, "hostname": "evil\x1b]0;pwned\x07\x9b"})
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "\x9b" not in text
    assert "Hostname:     evil?]0;pwned??" in text
