"""The client's terminal output, against golden files (tests/unit/golden/).

UPDATE_GOLDEN=1 rewrites the files from the current output; review the diff before committing.
"""

from __future__ import annotations

import copy
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from api.client.describe import describe_vm
from api.client.format import vm_table
from api.humanize import human_duration

GOLDEN = Path(__file__).parent / "golden"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def stamp(ago: timedelta) -> str:
    return (NOW - ago).isoformat().replace("+00:00", "Z")


def condition(type_: str, status: str, reason: str, message: str, at: str) -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": at}


def vm(name: str, project: str, phase: str, **status: Any) -> dict[str, Any]:
    ready = "True" if phase == "Running" else "False"
    base: dict[str, Any] = {
        "apiVersion": "tofu-qemu.dev/v1alpha1",
        "kind": "QemuVM",
        "metadata": {
            "project": project,
            "namespace": project,
            "name": name,
            "uid": f"uid-{name}",
            "generation": 2,
            "creationTimestamp": stamp(timedelta(hours=3, minutes=5)),
            "deletionTimestamp": None,
            "labels": {"tier": "web"},
            "annotations": {"tofu-qemu.dev/terraform-address": f'terraform_data.vm["{name}"]'},
            "stateSerial": 4,
            "resourceVersion": "17",
        },
        "spec": {
            "cpus": 1,
            "memory": 256,
            "machine": "q35",
            "accel": "auto",
            "runStrategy": "Always",
            "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz", "cmdline": ""},
            "disks": [{"name": "data", "image": None, "sha256": None, "size": 64, "reclaimPolicy": "Retain"}],
            "network": {"forwards": [{"protocol": "tcp", "guestPort": 80, "hostPort": None}]},
            "cloudInit": None,
            "stopTimeout": 30,
        },
        "status": {
            "phase": phase,
            "conditions": [
                condition("Valid", "True", "SpecAccepted", "", stamp(timedelta(hours=3))),
                condition(
                    "Ready",
                    ready,
                    "Running" if ready == "True" else "CrashLoopBackOff",
                    "" if ready == "True" else "next start in 4.0 s after killed-by-signal",
                    stamp(timedelta(minutes=7, seconds=30)),
                ),
            ],
            "observedGeneration": 2,
            "pid": 4242 if phase == "Running" else None,
            "accel": "tcg" if phase == "Running" else None,
            "ports": [{"protocol": "tcp", "guestPort": 80, "hostPort": 20080}],
            "restarts": 0,
            "failures": 0,
            "startedAt": stamp(timedelta(minutes=7, seconds=30)) if phase == "Running" else None,
            "lastExit": None,
            "nextRetryAt": None,
            "stopRequestedAt": None,
            "override": None,
        },
    }
    base["status"].update(status)
    return base


FLEET = [
    vm("web-01", "lab", "Running"),
    vm(
        "db",
        "production",
        "CrashLoopBackOff",
        restarts=12,
        ports=[],
        lastExit={
            "reason": "killed-by-signal",
            "exitCode": None,
            "signal": 9,
            "at": stamp(timedelta(seconds=5)),
            "message": "",
        },
        nextRetryAt=stamp(timedelta(seconds=-4)),
    ),
]
EVENTS = [
    {"time": stamp(timedelta(hours=3)), "type": "Normal", "reason": "Created", "message": "generation 1"},
    {
        "time": stamp(timedelta(minutes=8)),
        "type": "Normal",
        "reason": "Started",
        "message": "pid 4242 on tcg",
        "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
    },
    {
        "time": stamp(timedelta(seconds=40)),
        "type": "Normal",
        "reason": "RestartRequested",
        "message": "restart requested by alice",
        "traceId": "0af7651916cd43dd8448eb211c80319c",
        "traceUrl": "http://jaeger:16686/trace/0af7651916cd43dd8448eb211c80319c",
    },
]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs; UPDATE_GOLDEN=1 to accept"


def test_get_vms_table() -> None:
    check_golden("get-vms.txt", vm_table(FLEET, NOW))


def test_get_vms_wide_table() -> None:
    check_golden("get-vms-wide.txt", vm_table(FLEET, NOW, wide=True))


def test_colour_never_misaligns_columns() -> None:
    plain = vm_table(FLEET, NOW).splitlines()
    coloured = vm_table(FLEET, NOW, colour=True).splitlines()
    assert "\x1b[32mRunning\x1b[0m" in coloured[1]
    assert [
        line.replace("\x1b[32m", "").replace("\x1b[31m", "").replace("\x1b[0m", "") for line in coloured
    ] == plain


def test_describe_vm() -> None:
    stopped = copy.deepcopy(FLEET[0])
    stopped["status"]["override"] = {
        "stopped": False,
        "restartRequestedAt": stamp(timedelta(seconds=40)),
        "requestedBy": "alice",
        "updatedAt": stamp(timedelta(seconds=40)),
    }
    check_golden("describe-vm.txt", describe_vm(stopped, EVENTS, NOW))


def test_describe_a_crash_looping_vm_without_events() -> None:
    check_golden("describe-vm-crashing.txt", describe_vm(FLEET[1], [], NOW))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "<invalid>"),
        (-0.5, "0s"),
        (0, "0s"),
        (119, "119s"),
        (120, "2m"),
        (330, "5m30s"),
        (600, "10m"),
        (179 * 60, "179m"),
        (3 * 3600, "3h"),
        (7 * 3600 + 59 * 60, "7h59m"),
        (8 * 3600, "8h"),
        (47 * 3600, "47h"),
        (2 * 86400 + 5 * 3600, "2d5h"),
        (8 * 86400, "8d"),
        (800 * 86400, "2y70d"),
        (9 * 365 * 86400, "9y"),
    ],
)
def test_human_duration_matches_kubectl(seconds: float, text: str) -> None:
    assert human_duration(timedelta(seconds=seconds)) == text
