"""Network namespaces a test creates, so that guest egress is tested without the internet.

Two namespaces joined by a veth pair, both made by the test and deleted after it:
- "host": where the test's tofu-qemu (and so QEMU and passt) runs, with its own loopback and a
  default route to "net";
- "net": stands for the outside world, on TEST-NET-2 (198.51.100.0/24) and the IPv6 documentation
  prefix, holding the gateway and a server.
The test's own thread enters "host" (setns) for its duration: the servers it starts inherit it,
and its HTTP requests to them stay on that namespace's loopback. No packet reaches the machine's
own network: nothing of it is in either namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)
_IP_TIMEOUT = 10.0
IP = shutil.which("ip") or "/usr/sbin/ip"

GATEWAY4, HOST4, SERVER4 = "198.51.100.1", "198.51.100.2", "198.51.100.10"
GATEWAY6, HOST6, SERVER6 = "2001:db8:18::1", "2001:db8:18::2", "2001:db8:18::10"
SERVER_PORT = 8080


def _ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, timeout=_IP_TIMEOUT, capture_output=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns {path}: {os.strerror(error)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """The calling thread in network namespace `name` (sockets it makes and processes it starts
    are there), and back where it was afterwards."""
    original = f"/proc/self/task/{threading.get_native_id()}/ns/net"
    back = os.open(original, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(f"/run/netns/{name}")
        try:
            yield
        finally:
            if _LIBC.setns(back, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the test's own network namespace")
    finally:
        os.close(back)


@dataclass(frozen=True, slots=True)
class NamespacePair:
    host: str
    net: str


@contextlib.contextmanager
def namespace_pair(tag: str) -> Iterator[NamespacePair]:
    """Create the two namespaces and the veth pair between them; delete them afterwards."""
    names = NamespacePair(f"tq-{tag}-host", f"tq-{tag}-net")
    veth_host, veth_net = f"tq{tag}h"[:15], f"tq{tag}n"[:15]
    for name in (names.host, names.net):
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "delete", name)
        _ip("netns", "add", name)
    try:
        pair = ("type", "veth", "peer", "name", veth_net, "netns", names.net)
        _ip("link", "add", veth_host, "netns", names.host, *pair)
        for ns, veth, addresses in (
            (names.host, veth_host, (f"{HOST4}/24", f"{HOST6}/64")),
            (names.net, veth_net, (f"{GATEWAY4}/24", f"{SERVER4}/24", f"{GATEWAY6}/64", f"{SERVER6}/64")),
        ):
            _ip("-n", ns, "link", "set", "lo", "up")
            for address in addresses:
                _ip("-n", ns, "addr", "add", address, "dev", veth, *(("nodad",) if ":" in address else ()))
            _ip("-n", ns, "link", "set", veth, "up")
        _ip("-n", names.host, "route", "add", "default", "via", GATEWAY4)
        _ip("-n", names.host, "-6", "route", "add", "default", "via", GATEWAY6)
        yield names
    finally:
        for name in (names.host, names.net):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "delete", name)


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{self.server.label} from {self.client_address[0]}\n".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


@contextlib.contextmanager
def http_server(label: str, address: str, port: int = SERVER_PORT) -> Iterator[None]:
    """An HTTP server in the calling thread's namespace answering "<label> from <client>"; `::`
    serves IPv4 and IPv6 alike."""
    server = (
        _DualStackServer((address, port), _Answer)
        if ":" in address
        else ThreadingHTTPServer((address, port), _Answer)
    )
    server.label = label  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name=f"http-{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
