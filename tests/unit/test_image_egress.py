"""The image egress policy as a table, its socket factory, and the download settings' defaults
(the numbers docs/images.md gives)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from api.infra.settings import SettingsError, load_settings
from controller.images import EgressPolicy, FetchLimits, parse_networks
from controller.images.egress import AddressRefused, GuardedSocketFactory, RefusedSocket, embedded_ipv4
from controller.images.fetch import MAX_REDIRECTS
from controller.settings import ControllerSettings

DEFAULT = EgressPolicy()


@pytest.mark.parametrize(
    ("address", "refusal"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),  # IPv4-mapped: the IPv4 address decides
        ("2002:808:808::1", None),  # 6to4 of a public address
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address to refuse, not to bind
        ("::", "unspecified"),
        ("10.0.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.0.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%2", "link-local"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("224.0.0.251", "multicast"),
        ("ff02::fb", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.1", "private"),  # documentation
        ("::ffff:127.0.0.1", "IPv4-in-IPv6 loopback"),
        ("::ffff:10.0.0.1", "IPv4-in-IPv6 private"),
        ("::ffff:169.254.169.254", "IPv4-in-IPv6 link-local"),
        ("::127.0.0.1", "IPv4-in-IPv6 loopback"),  # IPv4-compatible (deprecated)
        ("64:ff9b::a00:1", "IPv4-in-IPv6 private"),  # NAT64
        ("64:ff9b:1::7f00:1", "IPv4-in-IPv6 loopback"),  # local-use NAT64
        ("2002:a9fe:a9fe::1", "IPv4-in-IPv6 link-local"),  # 6to4 of 169.254.169.254
    ],
)
def test_default_policy_table(address: str, refusal: str | None) -> None:
    assert DEFAULT.refusal(ipaddress.ip_address(address)) == refusal


def test_allowed_networks_open_exactly_those_networks() -> None:
    """An allowed network opens itself, in its IPv4-in-IPv6 forms too, and nothing beside it."""
    policy = EgressPolicy(parse_networks("10.20.0.0/16, 127.0.0.1, fd00:1::/32"))
    for allowed in ("10.20.3.4", "127.0.0.1", "::ffff:127.0.0.1", "fd00:1::5"):
        assert policy.refusal(ipaddress.ip_address(allowed)) is None, allowed
    for refused in ("10.21.0.1", "127.0.0.2", "::1", "fd00:2::5", "169.254.169.254"):
        assert policy.refusal(ipaddress.ip_address(refused)) is not None, refused


def test_embedded_ipv4_forms() -> None:
    assert embedded_ipv4(ipaddress.IPv6Address("::")) is None
    assert embedded_ipv4(ipaddress.IPv6Address("::1")) is None
    assert embedded_ipv4(ipaddress.IPv6Address("2001:db8::1")) is None
    assert str(embedded_ipv4(ipaddress.IPv6Address("::ffff:1.2.3.4"))) == "1.2.3.4"


@pytest.mark.parametrize("text", ["", " , ", None])
def test_no_allowed_networks(text: str | None) -> None:
    assert parse_networks(text) == ()


def test_a_bad_network_is_a_clear_settings_error() -> None:
    with pytest.raises(SettingsError, match=r"'10\.0\.0\.300/8' is not an IP network"):
        load_settings(ControllerSettings, flags={"image_fetch_allow_networks": "10.0.0.300/8"}, env={})


def test_literal_addresses_in_urls_are_checked() -> None:
    DEFAULT.refuse_literal("example.org")  # a name: the resolver checks it
    DEFAULT.refuse_literal("8.8.8.8")
    for host in ("127.0.0.1", "[::1]", "::ffff:127.0.0.1", "0.0.0.0", "127.1", "2130706433"):  # noqa: S104
        with pytest.raises(AddressRefused, match="address"):
            DEFAULT.refuse_literal(host)


def test_the_socket_factory_refuses_before_a_socket_exists() -> None:
    """The last check: a refused address gets no socket; an allowed one gets an unconnected one."""
    factory = GuardedSocketFactory(DEFAULT)
    with pytest.raises(RefusedSocket, match="loopback"):
        factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80)))
    with pytest.raises(RefusedSocket, match="link-local"):
        factory((socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1", 80, 0, 2)))
    created = factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 80)))
    created.close()


def test_download_settings_defaults() -> None:
    """The defaults docs/images.md documents."""
    settings = load_settings(ControllerSettings, flags={}, env={})
    assert settings.image_fetch_allow_networks is None
    assert settings.image_egress == EgressPolicy(())
    assert settings.image_fetch_limits == FetchLimits()
    limits = FetchLimits()
    assert limits.max_bytes == 64 * 2**30
    assert (limits.connect_timeout, limits.read_timeout) == (10.0, 60.0)
    assert limits.deadline == 6 * 3600
    assert (limits.min_bytes_per_second, limits.rate_window) == (10 * 1024, 60.0)
    assert limits.max_concurrent == 4
    assert MAX_REDIRECTS == 5


def test_download_settings_reach_the_limits() -> None:
    settings = load_settings(
        ControllerSettings,
        flags={},
        env={
            "TOFU_QEMU_IMAGE_FETCH_ALLOW_NETWORKS": "192.168.7.0/24",
            "TOFU_QEMU_IMAGE_DOWNLOAD_DEADLINE_SECONDS": "90",
            "TOFU_QEMU_IMAGE_DOWNLOAD_MIN_KIB_PER_SECOND": "0.5",
            "TOFU_QEMU_IMAGE_DOWNLOAD_RATE_WINDOW_SECONDS": "5",
            "TOFU_QEMU_IMAGE_MAX_CONCURRENT_DOWNLOADS": "2",
            "TOFU_QEMU_IMAGE_MAX_GIB": "0.5",
        },
    )
    assert settings.image_egress == EgressPolicy((ipaddress.IPv4Network("192.168.7.0/24"),))
    assert settings.image_fetch_limits == FetchLimits(
        max_bytes=2**29, deadline=90.0, min_bytes_per_second=512, rate_window=5.0, max_concurrent=2
    )
