"""Refusing cross-site writes from browsers (CSRF).

A browser that holds Basic credentials for the server sends them with any request a page of
another site makes, so a form on evil.example could POST /…/stop. Browsers say where a request
comes from (`Origin`, and `Sec-Fetch-Site` in current ones); a write whose origin is not this
server is refused. Terraform, OpenTofu, curl and the CLI send neither header and are unaffected.
Behind a reverse proxy that rewrites Host, the proxy must pass the original Host on.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from api.server.errors import Handler, status_response

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@web.middleware
async def same_origin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method not in SAFE_METHODS:
        problem = cross_site_problem(
            request.host, request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site")
        )
        if problem is not None:
            return status_response(403, problem)
    return await handler(request)


def cross_site_problem(host: str, origin: str | None, fetch_site: str | None) -> str | None:
    """Why a write with these headers is refused, or None. Pure."""
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"a {fetch_site} request may not change anything here"
    if origin is None:
        return None
    if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
        return f"a request from origin {origin[:100]!r} may not change anything on {host!r}"
    return None
