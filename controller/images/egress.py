"""Which addresses image downloads may connect to, checked after DNS resolution.

A state writer names the URL, so a download is a request the controller makes on a user's
behalf from its own network position. By default only globally routable unicast addresses
are reached; loopback, private, link-local, shared (CGNAT), multicast, reserved and unspecified
addresses are refused, in IPv4 and IPv6 alike, and so are IPv6 forms that embed such an IPv4
address (IPv4-mapped, IPv4-compatible, 6to4, NAT64). Operators allow a local mirror by network
(`image_fetch_allow_networks`).

Where the check sits, so that nothing connects before it:
- a host name is resolved once per connection by `GuardedResolver`, which refuses the name when
  any of its addresses is refused and hands aiohttp only the checked addresses: aiohttp connects
  to exactly those (no second lookup), so a DNS answer that changes after the check (rebinding)
  never reaches a socket. TLS still verifies the URL's host name;
- an address in the URL itself skips resolvers in aiohttp, so `refuse_literal` checks it before
  the request (every redirect hop included, since redirects are followed by hand);
- `GuardedSocketFactory`, the connector's socket factory, checks every address a socket is about to
  connect to, whatever path led there.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_COMPATIBLE = ipaddress.IPv6Network("::/96")


class AddressRefused(Exception):
    """A connection to an address the egress policy refuses; raised before any connect.

    Not an OSError, so aiohttp passes it through unwrapped from the resolver.
    """

    reason: ClassVar[str] = "ImageDownloadFailed"

    def __init__(self, host: str, category: str) -> None:
        article = "an" if category[:1] in "aeiouAEIOU" else "a"
        super().__init__(f"{host} is {article} {category} address")
        self.host = host
        self.category = category


class RefusedSocket(OSError):
    """The socket factory's refusal: aiohttp expects an OSError from a failed connect."""


def parse_networks(text: str | None) -> tuple[IPNetwork, ...]:
    """Networks from "CIDR,CIDR,..." (a bare address is a /32 or /128).

    :raise ValueError: an entry is not a network.
    """
    networks: list[IPNetwork] = []
    for entry in (text or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP network (CIDR like 10.0.0.0/8 or fd00::/8)") from None
    return tuple(networks)


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for when a host or a gateway would reach it
    through IPv4 (mapped, compatible, 6to4, NAT64), else None."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in _NAT64) or (
        address in _COMPATIBLE and int(address) > 1  # :: and ::1 are themselves, not IPv4
    ):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def category(address: IPAddress) -> str | None:
    """Why `address` is not a public unicast address ("loopback", "private", ...), or None."""
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("shared (CGNAT)", isinstance(address, ipaddress.IPv4Address) and address in _SHARED),
        ("private", address.is_private),
        ("non-global", not address.is_global),
    )
    return next((name for name, matches in checks if matches), None)


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Public unicast addresses, plus `allowed` networks (for a local mirror)."""

    allowed: tuple[IPNetwork, ...] = ()

    def refusal(self, address: IPAddress) -> str | None:
        """The category that refuses `address`, or None when it may be connected to."""
        if isinstance(address, ipaddress.IPv6Address):
            if address.scope_id:
                address = ipaddress.IPv6Address(str(address).partition("%")[0])
            inner = embedded_ipv4(address)
            if inner is not None:
                # The address a packet really goes to decides; its IPv6 form must not hide it.
                refused = self.refusal(inner)
                return refused if refused is None else f"IPv4-in-IPv6 {refused}"
        if any(address in network for network in self.allowed):
            return None
        return category(address)

    def check(self, host: str, addresses: Sequence[str]) -> None:
        """:raise AddressRefused: any of `addresses` is refused, or there are none."""
        for text in addresses:
            refused = self.refusal(ipaddress.ip_address(text))
            if refused is not None:
                raise AddressRefused(host, refused)
        if not addresses:
            raise AddressRefused(host, "unresolvable")

    def refuse_literal(self, host: str) -> None:
        """Check a URL host that is an IP address (aiohttp resolves no such host).

        :raise AddressRefused: it is an address, and a refused one.
        """
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            if host.replace(".", "").isdigit():  # 127.1, 2130706433, 0177.0.0.1: sockets' forms
                raise AddressRefused(host, "non-canonical IPv4") from None
            return  # a name: the resolver checks what it resolves to
        self.check(host, [str(address)])


class GuardedResolver(AbstractResolver):
    """Resolves with `inner` (the system resolver by default), once per connection, and returns
    only checked addresses. :raise AddressRefused: from `resolve`."""

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        self._policy.check(host, [result["host"] for result in results])
        return results

    async def close(self) -> None:
        await self._inner.close()


@dataclass(frozen=True, slots=True)
class GuardedSocketFactory:
    """The connector's socket factory: the last check before a connect, whatever path led to
    it. :raise RefusedSocket: the address is refused."""

    policy: EgressPolicy

    def __call__(self, addr_info: tuple[Any, ...]) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        refused = self.policy.refusal(ipaddress.ip_address(str(sockaddr[0])))
        if refused is not None:
            raise RefusedSocket(f"a {refused} address is not allowed")
        return socket.socket(family=family, type=kind, proto=proto)
