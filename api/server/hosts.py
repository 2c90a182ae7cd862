"""Refusing requests for host names this server does not answer to (DNS rebinding).

A page on evil.example can make its own name resolve to 127.0.0.1 after it loaded; the browser
then sends the page's requests to this server with `Host: evil.example`, and reads the answers
as same-origin. Without credentials (the loopback quick start) that would be the whole API. So,
like `kubectl proxy --accept-hosts`, only these Host values are answered, on every route
including the probes:

- any IP address (`127.0.0.1:8080`, `[::1]:8080`, `10.1.2.3`): a page whose origin is an address
  cannot be rebound, the browser talks to that address only;
- `localhost` (browsers resolve it to loopback themselves);
- the host name of the listen address (`listen = "myhost.lan:8080"`);
- the names in `allowed_hosts` (`*.lab.example` for subdomains; `*` turns the check off).

Any port is accepted. A request without Host (HTTP/1.0, not a browser) is answered. Others get a
403 Status naming the setting. The check applies with credentials too: a rebound page gets no
credentials from the browser, but the probes and an unauthenticated /metrics would answer it.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web
from aiohttp.typedefs import Middleware

from api.server.errors import Handler, status_response

DEFAULT_HOSTS = frozenset({"localhost"})
ANY_HOST = "*"


def allowed_host_names(listen_host: str, configured: frozenset[str]) -> frozenset[str]:
    """The names answered: the defaults, the listen host when it is a name, and `configured`."""
    names = DEFAULT_HOSTS | configured
    if listen_host and not _is_address(listen_host):
        names |= {listen_host.lower().rstrip(".")}
    return names


def host_problem(host: str | None, allowed: frozenset[str]) -> str | None:
    """Why a request with this Host header is refused, or None. Pure."""
    if host is None or ANY_HOST in allowed:
        return None
    name = _host_name(host)
    if _is_address(name) or name in allowed:
        return None
    if any(entry.startswith("*.") and name.endswith(entry[1:]) for entry in allowed):
        return None
    shown = host[:100]
    return (
        f"this server does not answer to host {shown!r} (DNS rebinding protection): "
        "add the name to allowed_hosts (TOFU_QEMU_ALLOWED_HOSTS) to allow it"
    )


def host_middleware(allowed: frozenset[str]) -> Middleware:
    """Refuse requests whose Host is not in `allowed` (see allowed_host_names)."""

    @web.middleware
    async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        problem = host_problem(request.headers.get("Host"), allowed)
        if problem is not None:
            return status_response(403, problem)
        return await handler(request)

    return check_host


def _host_name(host: str) -> str:
    """The name or address of a Host header value, without port, brackets or a trailing dot."""
    text = host.strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    name, sep, port = text.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        text = name
    return text.rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
