"""The guest agent end to end (docs/guest-agent.md): real QEMU, the tiny guest's real qemu-ga.

One VM for the whole module, booted from a disk (an overlay on rootfs.raw) so that a freeze has
a real ext4 to freeze: its addresses reach status, a freeze round trip works through the
agent, and its graceful stop goes through guest-shutdown (the guest says so on its console).
"""

from __future__ import annotations

import asyncio
import json
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.testing.waiting import wait_until
from controller.guest_agents import freeze, thaw
from controller.qemu.agent_channel import AGENT_SOCKET_NAME
from controller.qemu.argv import mac_address
from controller.qemu.guest_agent import GuestAgent
from tests.e2e.conftest import open_vm_host, report_host_on_failure
from tests.e2e.harness import GUEST_BOOT_TIMEOUT, VmHost, is_running_current
from tests.e2e.test_cli import Cli

pytestmark = pytest.mark.e2e

PROJECT = "agents"
NAME = "ga"
SPEC = {
    "memory": 256,
    "accel": "tcg",
    "stopTimeout": 120,  # far beyond the stop below: a stop through the power button or quit would show
    "guestAgent": True,
    "boot": {
        "kernel": "tiny-guest/vmlinuz",
        "initrd": "tiny-guest/initramfs.cpio.gz",
        # no_timer_check: a vCPU starved by a busy host fails the IO-APIC timer check and panics.
        "cmdline": "root=/dev/vda no_timer_check",
    },
    "disks": [{"name": "root", "image": "tiny-guest/rootfs.raw"}],
}
# The liveness period is the agents' poll period: short, so status follows the guest quickly.
SERVER_ARGS = ("--liveness-seconds", "1")


@pytest.fixture(scope="module")
def _module_host(
    tmp_path_factory: pytest.TempPathFactory, guest_images: Path, accel_cache: Path
) -> Iterator[VmHost]:
    host = open_vm_host(tmp_path_factory, guest_images, accel_cache)
    try:
        server = host.start("serve", extra_args=SERVER_ARGS)
        server.declare_vms(PROJECT, 1, {NAME: SPEC})
        yield host
    except BaseException:
        for title, text in host.diagnostics():
            print(f"==== {title}\n{text[-8000:]}", file=sys.stderr)
        raise
    finally:
        host.close()


@pytest.fixture
def host(request: pytest.FixtureRequest, _module_host: VmHost) -> VmHost:
    report_host_on_failure(request, _module_host)
    return _module_host


def _connected(vm: dict[str, Any]) -> bool:
    guest = vm["status"].get("guest") or {}
    return is_running_current(vm) and bool(guest.get("agentConnected")) and bool(guest.get("interfaces"))


def _run_dir(host: VmHost, vm: dict[str, Any]) -> Path:
    return host.data_dir / "run" / str(vm["metadata"]["uid"])


def test_the_guests_addresses_reach_status(host: VmHost) -> None:
    vm = host.wait_vm(
        PROJECT, NAME, _connected, what="status.guest from the agent", timeout=GUEST_BOOT_TIMEOUT
    )
    guest = vm["status"]["guest"]
    assert guest["hostname"] == NAME
    assert guest["osInfo"]["id"] == "tofu-tiny-guest"
    assert guest["osInfo"]["kernelRelease"].endswith("-cloud-amd64")
    eth0 = next(i for i in guest["interfaces"] if i["name"] == "eth0")
    assert eth0["mac"] == mac_address(vm["metadata"]["uid"])  # the MAC the controller gave it
    assert "10.0.2.15/24" in eth0["addresses"], json.dumps(guest)
    assert any(a.startswith("fe80::") for a in eth0["addresses"]), json.dumps(guest)
    # The Kubernetes-shaped API shows the same; the channel's socket is the server's user's only.
    kube = host.request("GET", f"/apis/tofu-qemu.dev/v1alpha1/namespaces/{PROJECT}/qemuvms/{NAME}")
    assert kube.status == 200
    assert kube.json()["status"]["guest"]["hostname"] == NAME
    run_dir = _run_dir(host, vm)
    assert stat.S_ISSOCK((run_dir / AGENT_SOCKET_NAME).stat().st_mode)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700


def test_a_freeze_round_trip_freezes_the_root_filesystem(host: VmHost) -> None:
    vm = host.wait_vm(PROJECT, NAME, _connected, what="the agent connected", timeout=GUEST_BOOT_TIMEOUT)
    run_dir = _run_dir(host, vm)

    async def round_trip() -> tuple[int, str, int, str]:
        frozen = await freeze(run_dir, 10.0)
        try:
            async with await GuestAgent.in_runtime_dir(run_dir, sync_seconds=5.0) as agent:
                during = await agent.freeze_status()
        finally:
            thawed = await thaw(run_dir, 10.0)
        async with await GuestAgent.in_runtime_dir(run_dir, sync_seconds=5.0) as agent:
            after = await agent.freeze_status()
        return frozen, during, thawed, after

    # The root ext4 on /dev/vda is the one block-device filesystem (the rest are tmpfs, proc...).
    assert asyncio.run(round_trip()) == (1, "frozen", 1, "thawed")


def test_a_snapshot_of_a_vm_with_an_agent_freezes_its_filesystems(host: VmHost) -> None:
    """The snapshot asked through the CLI freezes the guest's filesystems around its QMP
    transaction (docs/snapshots.md): it says GuestAgent, and the guest is thawed after."""
    vm = host.wait_vm(PROJECT, NAME, _connected, what="the agent connected", timeout=GUEST_BOOT_TIMEOUT)
    server = host.servers["serve"]
    assert "requested" in Cli(server).run("snapshot", "vm", NAME, "frozen", "-p", PROJECT)

    def ready() -> dict[str, Any] | None:
        answer = host.request("GET", f"/api/v1/projects/{PROJECT}/snapshots/frozen")
        found: dict[str, Any] | None = answer.json() if answer.status == 200 else None
        return found if found is not None and (found.get("status") or {}).get("readyToUse") else None

    snapshot = wait_until(ready, timeout=GUEST_BOOT_TIMEOUT, what="the snapshot ready")
    assert snapshot["status"]["indications"] == ["Online", "GuestAgent"], json.dumps(snapshot["status"])
    log = server.log_since_last_start()
    assert '"guest_frozen"' in log
    assert '"guest_thawed"' in log

    async def after() -> str:
        async with await GuestAgent.in_runtime_dir(_run_dir(host, vm), sync_seconds=5.0) as agent:
            return await agent.freeze_status()

    assert asyncio.run(after()) == "thawed"


def test_a_graceful_stop_goes_through_guest_shutdown(host: VmHost) -> None:
    vm = host.wait_vm(PROJECT, NAME, _connected, what="the agent connected", timeout=GUEST_BOOT_TIMEOUT)
    serial_log = _run_dir(host, vm) / "serial.log"
    host.servers["serve"].declare_vms(PROJECT, 2, {NAME: {**SPEC, "runStrategy": "Halted"}})

    stopped = host.wait_vm(
        PROJECT, NAME, lambda v: v["status"]["phase"] == "Stopped", what="Stopped by its guest"
    )
    assert stopped["status"]["lastExit"]["reason"] == "stopped-by-controller", json.dumps(stopped["status"])
    assert stopped["status"].get("guest") is None  # no process, nothing reported
    query = "SELECT message FROM events WHERE project = ? AND vm_name = ? AND reason = 'Stopping' ORDER BY id"
    messages = [str(row[0]) for row in host.sql(query, PROJECT, NAME)]
    # guest-shutdown ended it within AGENT_SHUTDOWN_WINDOW: no power button, no quit.
    assert messages == ["guest-shutdown sent to the guest agent: runStrategy is Halted"], messages
    wait_until(
        lambda: b"via=guest-agent" in serial_log.read_bytes(),
        timeout=5,
        what="the guest's own power-off line",
    )
    assert b"TOFU-GUEST-POWEROFF name=ga via=guest-agent action=poweroff" in serial_log.read_bytes()
