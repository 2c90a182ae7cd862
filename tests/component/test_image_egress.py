"""Server-side request forgery through image URLs: refused addresses are never connected to, by
URL, by DNS name, or by redirect, and no condition carries anything an internal server sent.

An "internal" loopback server (not allowed) holds a secret and counts requests: it must get
none. An allowed "mirror" on 127.0.0.2 redirects to it. Every socket connect of the test's
event loop is recorded, and any to a non-loopback address is refused there, so no packet
leaves this host even when a check is missing: a private or link-local address must show up
as refused before any connect, not as a failed connect.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from aiohttp.test_utils import TestServer
from yarl import URL

from api.images import RemoteImage
from controller.images import EgressPolicy, parse_networks
from controller.images.fetch import MAX_REDIRECTS
from controller.model import ImageLookup, ImageState
from tests.component.image_support import DIGEST, IMAGE, CacheFactory, Woken, fetched
from tests.component.image_support import images_dir as images_dir  # fixtures, re-exported
from tests.component.image_support import make_cache as make_cache
from tests.component.image_support import manual_clock as manual_clock
from tests.component.image_support import tasks as tasks
from tests.component.image_support import woken as woken

SECRET = b"internal-only: token=hunter2\n"
SECRET_DIGEST = hashlib.sha256(SECRET).hexdigest()
# What the internal sidecar says: a digest the audit saw echoed back as "expected <...>".
SIDECAR_CLAIM = hashlib.sha256(b"internal sidecar text").hexdigest()
# The internal service answers like an API would: a 401 with a telling reason phrase.
INTERNAL_REASON = "Unauthorized Internal Thing"
MIRROR_HOST = "127.0.0.2"
MIRROR_ONLY = EgressPolicy(parse_networks(f"{MIRROR_HOST}/32"))


@dataclass
class Internal:
    """What must stay unreachable: counts every request, on 127.0.0.1 and ::1."""

    requests: list[str] = field(default_factory=list)
    port: int = 0
    port6: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        if request.path.endswith(".sha256"):
            return web.Response(text=f"{SIDECAR_CLAIM}  x\n")
        if request.path.startswith("/auth"):
            return web.Response(status=401, reason=INTERNAL_REASON)
        return web.Response(body=SECRET)


@dataclass
class Mirror:
    """The allowed server: serves the image, or redirects wherever a test says."""

    internal: Internal
    redirects: dict[str, str] = field(default_factory=dict)
    # No keep-alive: every request of a download opens (and resolves for) a new connection.
    close_connections: bool = False
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        target = self.redirects.get(request.path)
        if target is not None:
            raise web.HTTPFound(target.format(port=self.internal.port, port6=self.internal.port6))
        if request.path.startswith("/hop/"):
            left = int(request.path.removeprefix("/hop/"))
            raise web.HTTPFound("/disk.img" if left <= 1 else f"/hop/{left - 1}")
        if request.path.endswith(".sha256"):
            response = web.Response(text=f"{DIGEST}  disk.img\n")
        else:
            response = web.Response(body=IMAGE)
        if self.close_connections:
            response.force_close()
        return response


@dataclass
class Connects:
    """Every address the event loop was asked to connect a socket to."""

    addresses: list[str] = field(default_factory=list)

    def beyond(self, *allowed: str) -> list[str]:
        return [address for address in self.addresses if address not in allowed]


async def serve(handler: Any, host: str) -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    server = TestServer(app, host=host)
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def internal() -> AsyncIterator[Internal]:
    target = Internal()
    async for v4 in serve(target.handle, "127.0.0.1"):
        async for v6 in serve(target.handle, "::1"):
            target.port, target.port6 = v4.port or 0, v6.port or 0
            yield target


@pytest.fixture
async def mirror(internal: Internal) -> AsyncIterator[Mirror]:
    target = Mirror(internal)
    async for server in serve(target.handle, MIRROR_HOST):
        target.url = f"http://{MIRROR_HOST}:{server.port}"
        yield target


@pytest.fixture
async def connects(monkeypatch: pytest.MonkeyPatch) -> Connects:
    """Record socket connects; refuse (without sending anything) any to a non-loopback address."""
    loop = asyncio.get_running_loop()
    original = loop.sock_connect
    seen = Connects()

    async def sock_connect(sock: socket.socket, address: Any) -> None:
        host = str(address[0])
        seen.addresses.append(host)
        if host not in ("127.0.0.1", MIRROR_HOST, "::1"):
            raise ConnectionRefusedError(f"the test refuses to connect to {host}")
        await original(sock, address)

    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    return seen


class StubDNS(AbstractResolver):
    """A DNS of the test's own: name -> the answers it gives, one per lookup (the last repeats)."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        answers = self.table[host]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        pass


def assert_no_readback(lookup: ImageLookup) -> None:
    """Nothing the internal server could have said is in the message."""
    for leak in (SECRET.decode().strip(), SECRET_DIGEST, SIDECAR_CLAIM, INTERNAL_REASON, "hunter2"):
        assert leak not in lookup.message, lookup.message
    # The status as a word of its own: ports (ephemeral, 5 digits) may contain "401".
    assert re.search(r"\b401\b", lookup.message) is None, lookup.message


# URL templates ({port}/{port6}: the internal server's) and the words the refusal must use.
DIRECT = [
    pytest.param("http://127.0.0.1:{port}/disk.img", "loopback", id="loopback"),
    pytest.param("http://127.1.2.3:{port}/disk.img", "loopback", id="loopback-other"),
    pytest.param("http://localhost:{port}/disk.img", "loopback", id="localhost-name"),
    pytest.param("http://[::1]:{port6}/disk.img", "loopback", id="ipv6-loopback"),
    pytest.param("http://[::ffff:127.0.0.1]:{port}/disk.img", "IPv4-in-IPv6 loopback", id="ipv4-mapped"),
    pytest.param("http://[::127.0.0.1]:{port}/disk.img", "IPv4-in-IPv6 loopback", id="ipv4-compatible"),
    pytest.param("http://[64:ff9b::7f00:1]:{port}/disk.img", "IPv4-in-IPv6 loopback", id="nat64-loopback"),
    pytest.param("http://[2002:7f00:1::1]:{port}/disk.img", "IPv4-in-IPv6 loopback", id="6to4-loopback"),
    pytest.param("http://0.0.0.0:{port}/disk.img", "unspecified", id="unspecified"),
    pytest.param("http://[::]:{port6}/disk.img", "unspecified", id="ipv6-unspecified"),
    pytest.param("http://10.1.2.3/disk.img", "private", id="private-10"),
    pytest.param("http://172.16.5.4/disk.img", "private", id="private-172"),
    pytest.param("http://192.168.1.1/disk.img", "private", id="private-192"),
    pytest.param("http://100.64.0.1/disk.img", "shared (CGNAT)", id="cgnat"),
    pytest.param("http://169.254.169.254/latest/meta-data", "link-local", id="metadata-link-local"),
    pytest.param("http://[fe80::1]/disk.img", "link-local", id="ipv6-link-local"),
    pytest.param("http://[fd00::1]/disk.img", "private", id="ipv6-unique-local"),
    pytest.param("http://224.0.0.1/disk.img", "multicast", id="multicast"),
    pytest.param("http://[ff02::1]/disk.img", "multicast", id="ipv6-multicast"),
    pytest.param("http://240.0.0.1/disk.img", "reserved", id="reserved"),
    pytest.param("http://127.1:{port}/disk.img", "non-canonical IPv4", id="short-ipv4"),
    pytest.param("http://2130706433:{port}/disk.img", "non-canonical IPv4", id="decimal-ipv4"),
    pytest.param("http://0x7f.1:{port}/disk.img", "loopback", id="hex-ipv4-name"),
    pytest.param("http://intranet.test/disk.img", "private", id="name-to-private"),
    pytest.param("http://metadata.test/disk.img", "link-local", id="name-to-link-local"),
    pytest.param("http://mixed.test:{port}/disk.img", "loopback", id="name-public-and-loopback"),
]
STUB_TABLE = {
    "intranet.test": [["10.9.8.7"]],
    "metadata.test": [["169.254.169.254"]],
    # One public answer does not launder a loopback one: any refused address refuses the name.
    "mixed.test": [["8.8.8.8", "127.0.0.1"]],
}


@pytest.mark.parametrize(("template", "category"), DIRECT)
@pytest.mark.parametrize("sidecar", [False, True], ids=["sha256", "sidecar"])
async def test_a_refused_address_is_refused_before_any_connect(
    make_cache: CacheFactory,
    woken: Woken,
    internal: Internal,
    connects: Connects,
    template: str,
    category: str,
    sidecar: bool,
) -> None:
    """Each refused address is FAILED with "refused", naming the category, and nothing
    connects anywhere; the sidecar read is checked the same way."""
    dns = StubDNS({name: [list(answer) for answer in answers] for name, answers in STUB_TABLE.items()})
    # localhost goes to the system resolver, as it would in production.
    resolver = _SystemFor({"localhost", "0x7f.1"}, dns)
    cache = await make_cache(egress=MIRROR_ONLY, resolver=resolver)
    url = template.format(port=internal.port, port6=internal.port6)
    lookup = await fetched(cache, woken, RemoteImage(url, None if sidecar else DIGEST))
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageDownloadFailed")
    article = "an" if category[0] in "aeiouI" else "a"
    assert f"refused: {_host(url)} is {article} {category} address" in lookup.message
    assert "image_fetch_allow_networks" in lookup.message
    assert connects.addresses == []
    assert internal.requests == []
    assert_no_readback(lookup)


REDIRECTS = [
    pytest.param("http://127.0.0.1:{port}/disk.img", id="to-loopback"),
    pytest.param("http://localhost:{port}/disk.img", id="to-localhost"),
    pytest.param("http://[::1]:{port6}/disk.img", id="to-ipv6-loopback"),
    pytest.param("http://[::ffff:127.0.0.1]:{port}/disk.img", id="to-ipv4-mapped"),
    pytest.param("http://169.254.169.254/latest/meta-data", id="to-link-local"),
    pytest.param("http://10.0.0.1/disk.img", id="to-private"),
    pytest.param("http://127.0.0.1:{port}/auth/disk.img", id="to-loopback-401"),
    pytest.param("file:///etc/passwd", id="to-file"),
]


@pytest.mark.parametrize("target", REDIRECTS)
@pytest.mark.parametrize("sidecar", [False, True], ids=["image", "sidecar"])
async def test_a_redirect_to_a_refused_address_is_refused_and_not_shown(
    make_cache: CacheFactory,
    woken: Woken,
    internal: Internal,
    mirror: Mirror,
    connects: Connects,
    target: str,
    sidecar: bool,
) -> None:
    """An allowed server redirecting to a refused address: refused, the internal server gets
    nothing, and the message names neither the target nor anything of it."""
    path = "/disk.img.sha256" if sidecar else "/disk.img"
    mirror.redirects[path] = target
    cache = await make_cache(egress=MIRROR_ONLY)
    lookup = await fetched(cache, woken, RemoteImage(f"{mirror.url}/disk.img", None if sidecar else DIGEST))
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageDownloadFailed")
    assert "refused: it redirects to" in lookup.message
    shown = target.format(port=internal.port, port6=internal.port6)
    for part in (shown, _host(shown) or "file:", f":{internal.port}/", "meta-data", "passwd"):
        assert part not in lookup.message
    assert internal.requests == []
    assert connects.beyond(MIRROR_HOST) == []
    assert_no_readback(lookup)


@pytest.mark.parametrize(("hops", "ok"), [(MAX_REDIRECTS, True), (MAX_REDIRECTS + 1, False)])
async def test_redirects_are_followed_up_to_the_cap(
    make_cache: CacheFactory, woken: Woken, mirror: Mirror, connects: Connects, hops: int, ok: bool
) -> None:
    """MAX_REDIRECTS (5) redirects still download; one more is refused."""
    assert MAX_REDIRECTS == 5
    cache = await make_cache(egress=MIRROR_ONLY)
    lookup = await fetched(cache, woken, RemoteImage(f"{mirror.url}/hop/{hops}", DIGEST))
    if ok:
        assert lookup.state is ImageState.READY
    else:
        assert lookup.state is ImageState.FAILED
        assert lookup.message == f"{mirror.url}/hop/{hops}: refused: more than 5 redirects"
    assert connects.beyond(MIRROR_HOST) == []


async def test_an_allowed_name_that_rebinds_to_loopback_never_reaches_it(
    make_cache: CacheFactory, woken: Woken, internal: Internal, mirror: Mirror, connects: Connects
) -> None:
    """DNS rebinding: the name answers the mirror's address for the sidecar's connection and
    loopback for the image's. Each connection goes to the address its own lookup checked, so
    the second is refused before it connects, and loopback sees nothing."""
    mirror.close_connections = True
    port = mirror.url.rsplit(":", 1)[1]
    dns = StubDNS({"rebind.test": [[MIRROR_HOST], ["127.0.0.1"]]})
    cache = await make_cache(egress=MIRROR_ONLY, resolver=dns)
    url = f"http://rebind.test:{port}/disk.img"
    lookup = await fetched(cache, woken, RemoteImage(url, None))
    assert dns.lookups == ["rebind.test", "rebind.test"]
    assert lookup.message == (
        f"{url}: refused: rebind.test is a loopback address, which image downloads may not reach"
        " (an operator can allow networks with image_fetch_allow_networks)"
    )
    assert connects.addresses == [MIRROR_HOST]
    assert internal.requests == []


async def test_an_internal_status_and_sidecar_are_not_read_back_from_an_allowed_network(
    make_cache: CacheFactory, woken: Woken, internal: Internal, connects: Connects
) -> None:
    """Even where the operator allowed the internal server's network, a condition shows the
    status class only, and a sidecar's digest never (what the audit read back)."""
    cache = await make_cache(egress=EgressPolicy(parse_networks("127.0.0.1/32")))
    base = f"http://127.0.0.1:{internal.port}"
    status = await fetched(cache, woken, RemoteImage(f"{base}/auth/disk.img", DIGEST))
    assert status.message == f"{base}/auth/disk.img: HTTP error 4xx"
    mismatch = await fetched(cache, woken, RemoteImage(f"{base}/secret.img", None), waiter="vm-2")
    assert mismatch.reason == "ImageChecksumMismatch"
    assert mismatch.message == (
        f"{base}/secret.img: the downloaded file does not match the sha256 its sidecar gives;"
        " nothing was cached"
    )
    for lookup in (status, mismatch):
        assert_no_readback(lookup)
    assert len(internal.requests) == 3


async def test_a_connect_failure_says_no_more_than_no_answer(make_cache: CacheFactory, woken: Woken) -> None:
    """A closed port of an allowed address reads like any other failure to get an answer, so
    conditions cannot tell closed from filtered ports."""
    cache = await make_cache()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # bound, not listening: connects are refused
        url = f"http://127.0.0.1:{closed}/disk.img"
        lookup = await fetched(cache, woken, RemoteImage(url, DIGEST))
    assert lookup.message == f"{url}: no answer (the connection failed or timed out)"


class _SystemFor(AbstractResolver):
    """The system resolver for `names`, the stub for the rest."""

    def __init__(self, names: set[str], stub: AbstractResolver) -> None:
        self._names, self._stub, self._system = names, stub, ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        chosen = self._system if host in self._names else self._stub
        return await chosen.resolve(host, port, family)

    async def close(self) -> None:
        await self._system.close()


def _host(url: str) -> str:
    return URL(url).raw_host or ""
