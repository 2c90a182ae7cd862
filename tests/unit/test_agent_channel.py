"""spec.guestAgent on the command line and in the canonical spec (docs/guest-agent.md)."""

from __future__ import annotations

from pathlib import PurePath

import pytest

from api.types import Accel, QemuVMSpec, QemuVMStatus, canonical_spec
from controller.qemu.agent_channel import AGENT_CHANNEL_NAME, AGENT_SOCKET_NAME, agent_channel_argv
from controller.qemu.argv import LaunchInputs, RuntimePaths, build_argv

UID = "0b8c6c1e-5d4a-4f0e-9a53-2f1d2a1c3b4d"
BOOT = {"boot": {"kernel": "tiny-guest/vmlinuz"}}


def argv_of(spec: QemuVMSpec) -> tuple[str, ...]:
    runtime = RuntimePaths(PurePath("/data/run") / UID)
    inputs = LaunchInputs(UID, "web", Accel.TCG, runtime, PurePath("/images"), {}, {})
    return build_argv(spec, inputs)


@pytest.mark.parametrize(
    ("machine", "controller"), [("q35", "virtio-serial-pci"), ("microvm", "virtio-serial-device")]
)
def test_the_channel_is_a_named_virtserialport_on_a_socket_in_the_runtime_dir(
    machine: str, controller: str
) -> None:
    argv = argv_of(QemuVMSpec.model_validate({**BOOT, "machine": machine, "guestAgent": True}))
    tail = argv[-6:]
    assert tail == (
        "-device",
        f"{controller},id=agent-serial",
        "-chardev",
        f"socket,id=agent,path={AGENT_SOCKET_NAME},server=on,wait=off",
        "-device",
        f"virtserialport,bus=agent-serial.0,chardev=agent,name={AGENT_CHANNEL_NAME}",
    )
    assert AGENT_CHANNEL_NAME == "org.qemu.guest_agent.0"  # the name qemu-ga and the tiny guest look for


def test_without_the_agent_argv_is_unchanged() -> None:
    spec = QemuVMSpec.model_validate(BOOT)
    assert agent_channel_argv(spec) == []
    assert not [arg for arg in argv_of(spec) if "agent" in arg]


def test_off_is_left_out_of_the_canonical_spec_so_generations_do_not_move() -> None:
    assert "guestAgent" not in canonical_spec(QemuVMSpec.model_validate(BOOT))
    assert "guestAgent" not in canonical_spec(QemuVMSpec.model_validate({**BOOT, "guestAgent": False}))
    assert canonical_spec(QemuVMSpec.model_validate({**BOOT, "guestAgent": True}))["guestAgent"] is True


def test_status_guest_round_trips_in_camel_case() -> None:
    raw = {
        "guest": {
            "agentConnected": True,
            "osInfo": {"id": "tofu-tiny-guest", "kernelRelease": "6.1.0"},
            "hostname": "web",
            "interfaces": [{"name": "eth0", "mac": "52:54:00:12:34:56", "addresses": ["10.0.2.15/24"]}],
        }
    }
    status = QemuVMStatus.model_validate(raw)
    assert status.guest is not None
    assert status.guest.interfaces[0].addresses == ("10.0.2.15/24",)
    assert (
        status.model_dump(mode="json", by_alias=True, exclude_defaults=True)["guest"]["osInfo"]["id"]
        == "tofu-tiny-guest"
    )
    assert QemuVMStatus().guest is None
