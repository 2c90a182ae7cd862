"""Server spans named and attributed by the stable HTTP semantic conventions.

The aiohttp instrumentation makes one server span per request. Two things are ours:

- It reads `OTEL_SEMCONV_STABILITY_OPT_IN` once, when it is installed; without `http` there, it
  writes the old attributes (`http.method`, `http.target`, `http.status_code`).
  `instrument_http_server` adds `http` to it, so spans carry `http.request.method`, `url.path`,
  `http.route` and `http.response.status_code` (an operator's `http/dup` is kept).
- It knows only the methods of RFC 9110, so the backend's LOCK and UNLOCK get
  `http.request.method=_OTHER` and the span name `HTTP /state/{project}/lock`. The middleware
  here names them `LOCK /state/{project}/lock` and `UNLOCK ...` and sets
  `http.request.method_original`. Only the extension methods a route serves are named, so a client
  sending made-up methods cannot mint span names.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from aiohttp import web
from opentelemetry import trace
from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
from opentelemetry.sdk.trace import TracerProvider

from api.server.errors import Handler

SEMCONV_OPT_IN = "OTEL_SEMCONV_STABILITY_OPT_IN"
# Methods beyond RFC 9110 that a route of ours serves: the http backend's lock calls.
EXTENSION_METHODS = frozenset({"LOCK", "UNLOCK"})
METHOD_ORIGINAL = "http.request.method_original"


def instrument_http_server(
    tracer_provider: TracerProvider, environ: MutableMapping[str, str] = os.environ
) -> None:
    """Put a server span around every request of every web.Application made after this call."""
    environ[SEMCONV_OPT_IN] = with_stable_http(environ.get(SEMCONV_OPT_IN, ""))
    AioHttpServerInstrumentor().instrument(tracer_provider=tracer_provider)


def with_stable_http(opt_in: str) -> str:
    """An OTEL_SEMCONV_STABILITY_OPT_IN value that selects the stable HTTP conventions."""
    wanted = [part.strip() for part in opt_in.split(",") if part.strip()]
    return ",".join(wanted if {"http", "http/dup"} & set(wanted) else [*wanted, "http"])


@web.middleware
async def span_name_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in EXTENSION_METHODS:
        span = trace.get_current_span()
        resource = request.match_info.route.resource
        if span.is_recording() and resource is not None:
            span.update_name(f"{request.method} {resource.canonical}")
            span.set_attribute(METHOD_ORIGINAL, request.method)
    return await handler(request)
