"""The passt loopback guard (controller/qemu/passt_guard.py) against the real kernel and Debian's
nft, in a network namespace the test creates (tests/e2e/netns_support.py): a process running as
`nobody`, the user passt runs as, tries TCP, UDP and ICMP echo to every loopback form, before and
after the guard is installed, and to the host's own non-loopback addresses; the host's own
connection to a port `nobody` serves (a forward) still works. A guest reaches these through
passt's sockets; the hostile guest itself is in tests/e2e/test_networking.py."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.qemu.passt import PASST_USER
from controller.qemu.passt_guard import GUARD_TABLE, NFT_BINARY, install_guard
from tests.e2e.netns_support import HOST4, HOST6, entered, namespace_pair

# What nobody tries per address; a refusal comes at once (the rule rejects), a timeout would
# also count as not reached.
TRY_SECONDS = 2.0
ECHO = {socket.AF_INET: (socket.IPPROTO_ICMP, 8), socket.AF_INET6: (socket.IPPROTO_ICMPV6, 128)}
# Destinations, not binds: 0.0.0.0 and :: as destinations mean this host.
UNSPECIFIED = ("0.0.0.0", "::")  # noqa: S104
LOOPBACK = ("127.0.0.1", "127.53.0.1", "::1", "::ffff:127.0.0.1", *UNSPECIFIED)
OWN_ADDRESSES = (HOST4, HOST6)


@pytest.fixture
def host_namespace() -> Iterator[None]:
    """This thread in a fresh "host" namespace, where nobody may use ICMP echo sockets."""
    with namespace_pair(f"g{os.getpid() % 100000}") as pair, entered(pair.host):
        Path("/proc/sys/net/ipv4/ping_group_range").write_text("0 2147483647\n")
        yield


@contextlib.contextmanager
def listeners() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Root's dual-stack TCP listener and UDP socket on every address of the namespace."""
    with (
        socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as tcp,
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp,
    ):
        udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        udp.bind(("::", 0))
        udp.setblocking(False)
        yield tcp, udp


def family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def try_tcp(address: str, port: int) -> str:
    with socket.socket(family(address), socket.SOCK_STREAM) as client:
        client.settimeout(TRY_SECONDS)
        try:
            client.connect((address, port))
        except OSError as err:
            return f"not reached ({err})"
        return "reached"


def try_udp(address: str, port: int) -> str:
    with socket.socket(family(address), socket.SOCK_DGRAM) as client:
        try:
            client.sendto(f"udp {address}".encode(), (address, port))
        except OSError as err:
            return f"not sent ({err})"
        return "sent"


def try_ping(address: str) -> str:
    protocol, kind = ECHO[family(address)]
    with socket.socket(family(address), socket.SOCK_DGRAM, protocol) as client:
        client.settimeout(TRY_SECONDS)
        try:
            client.sendto(bytes([kind, 0, 0, 0, 0, 1, 0, 1]), (address, 0))
            client.recv(64)
        except OSError as err:
            return f"not reached ({err})"
        return "reached"


def as_nobody(work: Callable[[int], None]) -> int:
    """Fork; the child (in this thread's network namespace) becomes nobody and runs `work` with
    the write end of a pipe, whose read end is returned."""
    user = pwd.getpwnam(PASST_USER)
    read, write = os.pipe()
    if os.fork() == 0:  # pragma: no cover (the child)
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            work(write)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    return read


def read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read()


def probe_as_nobody(
    tcp: socket.socket, udp: socket.socket, *addresses: str
) -> tuple[dict[str, str], set[str]]:
    """What nobody reached, and which of its UDP datagrams arrived."""
    tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]

    def work(out: int) -> None:
        results: dict[str, str] = {}
        for address in addresses:
            results[f"tcp {address}"] = try_tcp(address, tcp_port)
            results[f"udp {address}"] = try_udp(address, udp_port)
            if not address.startswith("::ffff:") and address not in UNSPECIFIED:
                results[f"ping {address}"] = try_ping(address)
        os.write(out, json.dumps(results).encode())

    results = json.loads(read_all(as_nobody(work)))
    os.wait()
    arrived: set[str] = set()
    with contextlib.suppress(BlockingIOError):
        while True:
            arrived.add(udp.recv(256).decode())
    return results, arrived


def serve_one_as_nobody(out: int) -> None:
    """A forward, as passt binds one on 127.0.0.1: its port to `out`, then one answer."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        os.write(out, str(server.getsockname()[1]).encode())
        os.close(out)
        connection, _ = server.accept()
        with connection:
            connection.sendall(b"forwarded")


def test_nobody_reaches_no_loopback_once_guarded_but_forwards_and_own_addresses_work(
    host_namespace: None,
) -> None:
    with listeners() as (tcp, udp):
        before, arrived = probe_as_nobody(tcp, udp, *LOOPBACK)
        assert all(outcome in ("reached", "sent") for outcome in before.values()), before
        assert arrived == {f"udp {address}" for address in LOOPBACK}

        assert install_guard() == ""
        assert install_guard() == ""  # again at the next start: the table is replaced, not doubled
        nft = shutil.which(NFT_BINARY) or NFT_BINARY
        listed = subprocess.run(
            [nft, "list", "table", "inet", GUARD_TABLE],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        assert listed.stdout.count("reject") == 2

        after, arrived = probe_as_nobody(tcp, udp, *LOOPBACK, *OWN_ADDRESSES)
        # (A refused datagram may fail at sendto or vanish later: what counts is that none arrived.)
        for address in LOOPBACK:
            assert after[f"tcp {address}"].startswith("not reached"), after
            assert not after.get(f"ping {address}", "not").startswith("reached"), after
        # The host's own non-loopback addresses are like any host on its network.
        for address in OWN_ADDRESSES:
            assert after[f"tcp {address}"] == "reached"
            assert after[f"ping {address}"] == "reached"
        assert arrived == {f"udp {address}" for address in OWN_ADDRESSES}

        # Root (the server, anything but passt) is not matched.
        with socket.create_connection(("127.0.0.1", tcp.getsockname()[1]), timeout=2):
            pass

    # A forward: the host connects to a port nobody serves on 127.0.0.1, and nobody's answer
    # (not a new flow) comes back.
    port = int(read_all(as_nobody(serve_one_as_nobody)))
    with socket.create_connection(("127.0.0.1", port), timeout=TRY_SECONDS) as client:
        assert client.recv(64) == b"forwarded"
    assert os.waitstatus_to_exitcode(os.wait()[1]) == 0
