"""Guest networking end to end (docs/networking.md): a real server with guest_egress on, real QEMU
(TCG), Debian's passt and the tiny guest, inside network namespaces the test creates
(tests/e2e/netns_support.py), so no packet reaches any other network.

The guest sends `GET /` to given addresses itself every 2 s (`tofu.fetch=`, docs/guest.md) and
publishes the results at /fetch.txt, which the test reads through the VM's forward. What each VM
shows:
- "out", mode passt, egress by the server's default: it reaches the TEST-NET server over IPv4,
  and over IPv6 with the address it configures from passt's router advertisement (the server
  sees the host's address: passt's sockets are the host's), and its forward answers through
  passt. Its request to the gateway's address reaches the real gateway (the net namespace's
  server), never the server on the host's 127.0.0.1 on the same port: that is `--no-map-gw`.
  Without it passt would map the gateway to the host's loopback, and the answer would name
  "host-loopback".
  "out" is also the hostile root guest (`tofu.lo_out=1`): it routes 127.0.0.0/8 to its gateway,
  so its GET to 127.0.0.1:8080 reaches passt, which (2023.03) connects to the host's
  127.0.0.1:8080 and gets "host-loopback": the gap the loopback guard closes.
- "shut", mode user (no egress): neither the TEST-NET server nor 10.0.2.2 (SLIRP's alias of the
  host's 127.0.0.1) answers it.
- a spec asking egress in mode user is Valid=False, with the reason.
Then a controller restart with `guest_loopback_guard` on (its default) adopts passt (same pid, forward still
answering) and installs the guard: the same guest's next GET to 127.0.0.1 fails, while its egress
to the TEST-NET server still works. Deleting the VM ends passt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from api.testing.waiting import wait_until
from controller.qemu.process import is_running_process, read_cmdline
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import VmHost, condition, get_guest_page, host_port, is_running_current
from tests.e2e.netns_support import (
    GATEWAY4,
    HOST4,
    HOST6,
    SERVER4,
    SERVER6,
    SERVER_PORT,
    entered,
    http_server,
    namespace_pair,
)

pytestmark = pytest.mark.e2e

PROJECT = "networking"
# Under TCG a boot takes seconds on a quiet host, minutes on a shared 2-core one at load 60.
BOOT_TIMEOUT = 600.0
# After the guest is up: its fetch loop's first pass, and each GET through the forward.
FETCH_TIMEOUT = 120.0
PAGE_TIMEOUT = 10.0
TESTNET = f"{SERVER4}/{SERVER_PORT}"
GATEWAY = f"{GATEWAY4}/{SERVER_PORT}"
SLIRP_HOST = f"10.0.2.2/{SERVER_PORT}"
TESTNET6 = f"{SERVER6}/{SERVER_PORT}"
HOST_LOOPBACK = f"127.0.0.1/{SERVER_PORT}"
KERNEL, INITRD = "tiny-guest/vmlinuz", "tiny-guest/initramfs.cpio.gz"


def vm_spec(network: dict[str, Any], *fetch: str, ip: str = "") -> dict[str, Any]:
    cmdline = " ".join(filter(None, ["no_timer_check", ip, "tofu.fetch=" + ",".join(fetch)]))
    return {
        "memory": 192,
        "accel": "tcg",
        "stopTimeout": 10,
        "boot": {"kernel": KERNEL, "initrd": INITRD, "cmdline": cmdline},
        "network": {"forwards": [{"guestPort": 80}], **network},
    }


SPECS = {
    # tofu.lo_out=1: the hostile root guest, which routes 127.0.0.0/8 to its gateway.
    "out": vm_spec(
        {"mode": "passt"}, TESTNET, GATEWAY, TESTNET6, HOST_LOOPBACK, ip="tofu.ip=dhcp tofu.lo_out=1"
    ),
    "shut": vm_spec({}, TESTNET, SLIRP_HOST),
    "refused": vm_spec({"egress": True}, TESTNET),
}


@pytest.fixture
def netns_host(make_vm_host: MakeVmHost) -> Iterator[VmHost]:
    """A VmHost whose server runs in the test's "host" namespace, beside a server on its
    127.0.0.1, with the "net" namespace's server as the outside world."""
    with namespace_pair(f"n{os.getpid() % 100000}") as pair:  # noqa: SIM117 (each enters the last)
        with entered(pair.net), http_server("testnet", "::"):
            with entered(pair.host), http_server("host-loopback", "127.0.0.1"):
                yield make_vm_host()


def serial_log(host: VmHost, vm: dict[str, Any]) -> str:
    path = host.data_dir / "run" / vm["metadata"]["uid"] / "serial.log"
    return path.read_bytes().decode(errors="replace") if path.exists() else ""


def fetched(host: VmHost, vm: dict[str, Any], *wanted: str) -> str:
    """The guest's /fetch.txt once it holds every line of `wanted` (results of one pass)."""
    port = host_port(vm)
    name = vm["metadata"]["name"]
    wait_until(
        lambda: True if "TOFU-GUEST-READY" in serial_log(host, vm) else None,
        timeout=BOOT_TIMEOUT,
        what=f"{name} booted",
        describe=lambda: serial_log(host, vm)[-2000:],
    )

    last = [""]

    def check() -> str | None:
        status, text = get_guest_page(port, "/fetch.txt", timeout=PAGE_TIMEOUT)
        last[0] = text
        return text if status == 200 and all(line in text for line in wanted) else None

    return wait_until(
        check, timeout=FETCH_TIMEOUT, what=f"{wanted} in {name}'s /fetch.txt", describe=lambda: last[0]
    )


def passt_pid(host: VmHost, vm: dict[str, Any]) -> int | None:
    record = host.data_dir / "run" / vm["metadata"]["uid"] / "passt" / "launch.json"
    if not record.exists():
        return None
    pid = int(json.loads(record.read_text())["pid"])
    return pid if is_running_process(pid) and (read_cmdline(pid) or ("",))[0] == "passt" else None


def test_passt_egress_reaches_the_hosts_loopback_only_without_the_guard_and_user_mode_has_none(
    netns_host: VmHost,
) -> None:
    host = netns_host
    server = host.server("serve", extra_args=["--guest-egress"])
    server.extra_env["TOFU_QEMU_GUEST_LOOPBACK_GUARD"] = "false"  # until the restart below
    server.start()
    server.declare_vms(PROJECT, 1, SPECS)

    refused = host.wait_vm(PROJECT, "refused", lambda vm: vm["status"]["phase"] == "Invalid", what="Invalid")
    valid = condition(refused, "Valid")
    assert valid["status"] == "False"
    assert "egress needs mode passt" in valid["message"]

    out = host.wait_vm(PROJECT, "out", is_running_current, what="Running")
    shut = host.wait_vm(PROJECT, "shut", is_running_current, what="Running")
    argv = read_cmdline(out["status"]["pid"]) or ()
    assert any(arg.startswith("stream,id=net0,server=off,addr.type=unix,addr.path=passt/") for arg in argv)

    text = fetched(
        host,
        out,
        f"ok {TESTNET} testnet from ::ffff:{HOST4}",
        f"ok {GATEWAY} testnet from",
        f"ok {TESTNET6} testnet from {HOST6}",
        # Without the guard, the hostile guest's crafted packets reach the host's loopback.
        f"ok {HOST_LOOPBACK} host-loopback from 127.0.0.1",
    )
    # The gateway's address is the gateway, not the host: its line names "testnet" (wanted above).
    # IPv6: the guest configures a global address from passt's router advertisement (SLAAC).
    assert "inet6 2001:db8:18:" in text

    blocked = fetched(host, shut, f"failed {TESTNET}", f"failed {SLIRP_HOST}")
    assert "ok " not in blocked

    # A controller restart adopts passt: the same process, the forward still answering. It comes
    # with the loopback guard, which applies to the adopted passt's next connections too.
    pid = passt_pid(host, out)
    assert pid is not None
    assert host.stop() == 0
    del server.extra_env["TOFU_QEMU_GUEST_LOOPBACK_GUARD"]  # the guard is on by default
    server = host.start("serve")
    wait_until(lambda: "passt_adopted" in server.log_since_last_start(), timeout=30, what="passt adopted")
    assert "passt_loopback_guard_installed" in server.log_since_last_start()
    assert passt_pid(host, out) == pid
    assert get_guest_page(host_port(out), "/info.txt", timeout=FETCH_TIMEOUT)[1].startswith("name=out")
    guarded = fetched(host, out, f"failed {HOST_LOOPBACK}", f"ok {TESTNET} testnet from ::ffff:{HOST4}")
    assert "host-loopback" not in guarded

    # Deleting the VM ends passt with QEMU.
    server.declare_vms(PROJECT, 2, {"shut": SPECS["shut"]})
    wait_until(lambda: host.vm_or_none(PROJECT, "out") is None, timeout=60, what="out deleted")
    wait_until(lambda: not is_running_process(pid), timeout=10, what="passt ended")
