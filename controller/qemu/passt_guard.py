"""The loopback guard (docs/networking.md): nftables rules that refuse every new flow passt opens
to the host's loopback, so a guest with egress never reaches a service on 127.0.0.1 or ::1.

Why a firewall rule: Debian 12's passt (2023.03) hands a guest's packets addressed to 127.0.0.1
(or ::1) to sockets of its own on the host, and has no option against it. `--no-map-gw` covers
only the gateway's address. `--outbound-if4`/`--outbound-if6` bind passt's sockets to an
interface, which would keep them off `lo`, but passt skips that binding for loopback destinations
(tcp_conn_from_tap and udp_tap_handler in its source), exactly the case that matters.

The rules match the user passt runs as (`nobody`: the server runs as root, see passt.py) and new
flows only: the host's own connections to the forwards passt binds, and passt's replies on them,
still pass. IPv4-mapped (::ffff:127.0.0.1) and unspecified (0.0.0.0, ::) destinations leave
the kernel as 127.0.0.1 or ::1, so the same two rules cover them. They live in the server's
network namespace and stay after the server exits, as passt does (it outlives a controller
restart); installing them again replaces the table in one transaction.

On by default (`guest_loopback_guard`), installed at start-up when `guest_egress` is on. It
needs root (CAP_NET_ADMIN) and nftables; where they are missing (a container), mode passt is
Valid=False with the reason, until the operator turns the guard off and so accepts the gap.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

import structlog

from controller.qemu.passt import PASST_USER, probe

log = structlog.get_logger(__name__)

GUARD_TABLE = "tofu_qemu_passt_guard"
NFT_BINARY = "nft"
# nft loads a ruleset this small in milliseconds; more means the host is wedged.
NFT_SECONDS = 10.0


def guard_ruleset(uid: int) -> str:
    """The nft script: (re)create the table, in one transaction, refusing `uid`'s new flows to loopback."""
    return (
        f"add table inet {GUARD_TABLE}\n"
        f"delete table inet {GUARD_TABLE}\n"
        f"table inet {GUARD_TABLE} {{\n"
        "\tchain output {\n"
        "\t\ttype filter hook output priority filter; policy accept;\n"
        f"\t\tmeta skuid {uid} ip daddr 127.0.0.0/8 ct state new counter reject\n"
        f"\t\tmeta skuid {uid} ip6 daddr ::1 ct state new counter reject\n"
        "\t}\n"
        "}\n"
    )


def install_guard() -> str:
    """Install the guard for the user passt runs as; why it cannot be ("" when installed).
    Blocking (at most NFT_SECONDS); run once at start-up, in a thread."""
    if os.geteuid() != 0:
        return f"it needs the server to run as root, so that passt runs as {PASST_USER}, whom it matches"
    nft = shutil.which(NFT_BINARY)
    if nft is None:
        return "nft is not installed (Debian's nftables package)"
    uid = pwd.getpwnam(PASST_USER).pw_uid
    try:
        done = subprocess.run(
            [nft, "-f", "-"],
            input=guard_ruleset(uid).encode(),
            capture_output=True,
            timeout=NFT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"nft did not finish within {NFT_SECONDS:g} s"
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        return f"nft failed ({lines[0] if lines else f'exit status {done.returncode}'})"
    log.info("passt_loopback_guard_installed", table=f"inet {GUARD_TABLE}", uid=uid)
    return ""


def passt_host_problem(loopback_guard: bool) -> str:
    """Why mode passt cannot run here ("" when it can): passt itself, then the guard if asked for."""
    problem = probe()
    if problem or not loopback_guard:
        return problem
    refused = install_guard()
    if not refused:
        return ""
    return (
        f"the loopback guard cannot be installed ({refused}); without it a guest could reach the "
        "host's loopback: see docs/networking.md, setting guest_loopback_guard"
    )
