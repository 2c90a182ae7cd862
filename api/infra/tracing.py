"""OpenTelemetry tracing, configured from the standard OTEL_* environment.

- `OTEL_TRACES_EXPORTER`: `otlp`, `console` or `none` (default), comma-separated for several;
  `--otlp-endpoint URL` is a shorthand for `otlp` at that endpoint.
- `OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`): `http/protobuf` (default) or `grpc`.
- Endpoint, headers, timeout, compression, `OTEL_SERVICE_NAME` (default `tofu-qemu`),
  `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]` and `OTEL_BSP_*` are read by the SDK.

A TracerProvider is installed even when nothing is exported: spans then cost microseconds and
give every log line of one reconcile or request a shared trace_id to group by. Export is
batched on the SDK's own thread, so a slow or absent collector never holds up a reconcile; the
queue drops spans when full rather than grow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import HOST_NAME, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

DEFAULT_SERVICE_NAME = "tofu-qemu"
# How long shutdown waits for queued spans; an unreachable collector must not hold up an exit.
SHUTDOWN_FLUSH_MILLIS = 3000
_HTTP_TRACES_PATH = "/v1/traces"
_PROPAGATOR = TraceContextTextMapPropagator()


class TracingConfigError(ValueError):
    """The OTEL_* settings ask for something this server cannot do; the message says what."""


def configure_tracing(
    *, otlp_endpoint: str | None = None, environ: Mapping[str, str] = os.environ, host_name: str | None = None
) -> TracerProvider:
    """Install the process's TracerProvider (once per process) and return it for shutdown.

    `host_name`: a controller's host (docs/multi-host.md), as the resource attribute `host.name`.

    :raise TracingConfigError: an unknown exporter or protocol.
    """
    provider = TracerProvider(resource=service_resource(environ, host_name=host_name))
    for exporter in span_exporters(otlp_endpoint, environ):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def shutdown_tracing(provider: TracerProvider) -> None:
    """Send what is queued (bounded wait), then stop the export thread."""
    provider.force_flush(SHUTDOWN_FLUSH_MILLIS)
    provider.shutdown()


def current_traceparent() -> str | None:
    """The current span as a W3C `traceparent` header value, to store beside what it caused."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def span_context_of(traceparent: str | None) -> trace.SpanContext | None:
    """The span a stored `traceparent` names, for a link; None when absent or malformed."""
    if not traceparent:
        return None
    context = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
    return context if context.is_valid else None


def service_resource(environ: Mapping[str, str], *, host_name: str | None = None) -> Resource:
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; attributes passed
    # here would override them, so the defaults are passed only when neither sets them.
    configured = environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    named = "OTEL_SERVICE_NAME" in environ or "service.name=" in configured
    attributes: dict[str, str] = {} if named else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
    if host_name is not None and "host.name=" not in configured:
        attributes[HOST_NAME] = host_name
    return Resource.create(attributes)


def span_exporters(otlp_endpoint: str | None, environ: Mapping[str, str]) -> list[SpanExporter]:
    names = {name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "none").split(",")}
    names.discard("")
    if otlp_endpoint:
        names = (names - {"none"}) | {"otlp"}
    unknown = names - {"otlp", "console", "none"}
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER {', '.join(sorted(unknown))!r} is not supported: use otlp, console or none"
        )
    exporters: list[SpanExporter] = []
    if "otlp" in names:
        exporters.append(_otlp_exporter(otlp_endpoint, environ))
    if "console" in names:
        exporters.append(ConsoleSpanExporter())
    return exporters


def _otlp_exporter(endpoint: str | None, environ: Mapping[str, str]) -> SpanExporter:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint) if endpoint else GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        # An explicit endpoint is used as given by the exporter; the env base URL gets the path
        # appended by the exporter itself. The shorthand takes a base URL like the env variable.
        return HttpExporter(endpoint=_traces_url(endpoint)) if endpoint else HttpExporter()
    raise TracingConfigError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r} is not supported: use http/protobuf or grpc"
    )


def _traces_url(endpoint: str) -> str:
    base = endpoint.rstrip("/")
    return base if base.endswith(_HTTP_TRACES_PATH) else base + _HTTP_TRACES_PATH
