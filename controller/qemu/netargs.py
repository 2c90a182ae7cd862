"""The guest's network on QEMU's command line, and passt's command line. Pure (docs/networking.md).

- mode user: QEMU's SLIRP with `restrict=on`, so the guest reaches nothing but what the forwards
  bring to it; forwards are `hostfwd`s bound to the forward address.
- mode passt: QEMU connects its NIC to the VM's passt over a UNIX socket (`-netdev stream`); passt
  binds the forwards (`-t`/`-u ADDRESS/HOST:GUEST`) and gives the guest egress, with
  `--no-map-gw` so that the gateway address is not the host's loopback (as 10.0.2.2 is in SLIRP).

The socket's name carries a digest of passt's argv: a change of the forwards changes QEMU's argv
too, so the VM restarts with a passt that binds the new ports.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath

from api.types import NetworkMode, NetworkSpec, Protocol

# argv.py calls netdev_argv, and this module uses its escaping: a module import, not names.
from controller.qemu import argv as qemu_argv

PASST_BINARY = "passt"
PASST_DIR_NAME = "passt"
_SOCKET_DIGEST_LENGTH = 12
_PASST_PORT_OPTIONS = {Protocol.TCP: "-t", Protocol.UDP: "-u"}
# passt serves one QEMU and exits when it disconnects (--one-off), in the foreground (so its
# supervisor waits for it), logging warnings only (to its stderr file).
_PASST_FIXED = (PASST_BINARY, "--foreground", "--quiet", "--one-off", "--no-map-gw")


def passt_paths(runtime: qemu_argv.RuntimePaths) -> qemu_argv.RuntimePaths:
    """passt's own runtime dir inside the VM's: its lock, launch record, socket and stderr."""
    return qemu_argv.RuntimePaths(runtime.directory / PASST_DIR_NAME, program="passt")


def passt_argv(
    network: NetworkSpec, host_ports: Mapping[tuple[Protocol, int], int], address: str
) -> tuple[str, ...]:
    """passt for one VM: its socket (relative to its dir) and its forwards bound to `address`.

    :raise KeyError: a forward whose host port the controller did not resolve.
    """
    forwards: list[str] = []
    for forward in network.forwards:
        host_port = host_ports[(forward.protocol, forward.guest_port)]
        forwards += [_PASST_PORT_OPTIONS[forward.protocol], f"{address}/{host_port}:{forward.guest_port}"]
    unnamed = (*_PASST_FIXED, *forwards)
    return (*_PASST_FIXED, "--socket", passt_socket_name(unnamed), *forwards)


def passt_socket_name(unnamed_argv: tuple[str, ...]) -> str:
    return f"passt-{qemu_argv.argv_digest(unnamed_argv)[:_SOCKET_DIGEST_LENGTH]}.sock"


def socket_of(passt: tuple[str, ...]) -> str:
    """The socket name in a passt argv built by passt_argv."""
    return passt[passt.index("--socket") + 1]


def netdev_argv(
    network: NetworkSpec, host_ports: Mapping[tuple[Protocol, int], int], address: str
) -> tuple[str, ...]:
    """QEMU's -netdev for the guest's NIC, with the id `net0`."""
    if network.mode is NetworkMode.PASST:
        socket = PurePath(PASST_DIR_NAME) / socket_of(passt_argv(network, host_ports, address))
        return (
            "-netdev",
            f"stream,id=net0,server=off,addr.type=unix,addr.path={qemu_argv.option_value(str(socket))}",
        )
    forwards = [
        f"hostfwd={forward.protocol.value}:{address}:{host_ports[(forward.protocol, forward.guest_port)]}"
        f"-:{forward.guest_port}"
        for forward in network.forwards
    ]
    return ("-netdev", ",".join(["user", "id=net0", "restrict=on", *forwards]))
