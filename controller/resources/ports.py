"""Host port allocation for user-mode network forwards.

A port is reserved in the store (UNIQUE per protocol) before QEMU binds it, and probed by
binding it first, so a port held by a foreign process is skipped. The probe is racy by nature
(bind-then-close, docs/guest.md#qemu-behaviours-the-code-relies-on); QEMU failing on a busy port
is reported and retried.
"""

from __future__ import annotations

import errno
import socket

from api.store.contracts import AllocationLedger
from api.store.records import PortTaken
from api.types import Protocol
from controller.model import PortKey

LOOPBACK = "127.0.0.1"


class PortUnavailable(Exception):
    """No port could be reserved: the range is exhausted, or a requested hostPort is taken or
    outside the range."""


def is_bindable(protocol: Protocol, port: int, host: str = LOOPBACK) -> bool:
    kind = socket.SOCK_STREAM if protocol is Protocol.TCP else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


class PortAllocator:
    def __init__(
        self, allocations: AllocationLedger, *, first: int, last: int, address: str = LOOPBACK
    ) -> None:
        """`address`: where QEMU's forwards will listen, so the probe binds the same address."""
        if not 1024 <= first <= last <= 65535:
            raise ValueError(f"port range {first}-{last} must lie within 1024-65535")
        self._allocations = allocations
        self._address = address
        self._first, self._last = first, last
        self._next = first

    async def allocate(self, uid: str, requested: tuple[tuple[PortKey, int | None], ...]) -> None:
        """Reserve a host port for each forward; None means any free port in the range.

        :raise PortUnavailable: a requested port is held, or the range has no free port.
        """
        for (protocol, guest_port), wanted in requested:
            if wanted is not None:
                await self._reserve_requested(uid, protocol, guest_port, wanted)
            else:
                await self._reserve_any(uid, protocol, guest_port)

    async def release(self, uid: str, keys: tuple[PortKey, ...]) -> None:
        await self._allocations.release_ports(uid, list(keys))

    async def _reserve_requested(self, uid: str, protocol: Protocol, guest_port: int, port: int) -> None:
        if not self._first <= port <= self._last:
            # Admission refuses such a spec first; this keeps the range a hard limit regardless.
            raise PortUnavailable(f"hostPort {port} is outside the port range {self._first}-{self._last}")
        if not is_bindable(protocol, port, self._address):
            raise PortUnavailable(f"hostPort {protocol.value}/{port} is in use by another process")
        try:
            await self._allocations.reserve_port(uid, protocol, guest_port, port)
        except PortTaken as err:
            raise PortUnavailable(f"hostPort {protocol.value}/{port} is held by another VM") from err

    async def _reserve_any(self, uid: str, protocol: Protocol, guest_port: int) -> None:
        rows = await self._allocations.ports()
        if any(r.uid == uid and r.protocol is protocol and r.guest_port == guest_port for r in rows):
            return
        held = {row.host_port for row in rows if row.protocol is protocol}
        size = self._last - self._first + 1
        for offset in range(size):
            # Rotate through the range so a just-released port is not reused at once.
            port = self._first + (self._next - self._first + offset) % size
            if port in held or not is_bindable(protocol, port, self._address):
                continue
            try:
                await self._allocations.reserve_port(uid, protocol, guest_port, port)
            except PortTaken:
                continue
            self._next = port + 1 if port < self._last else self._first
            return
        raise PortUnavailable(f"no free {protocol.value} port in {self._first}-{self._last}")
