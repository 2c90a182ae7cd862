"""Tracing configured from OTEL_* variables: exporter and protocol choice, endpoints, the service name.

The process-wide TracerProvider can be installed once, so these tests build the exporters the way
`configure_tracing` does and export through them, over OTLP/HTTP and OTLP/gRPC, on loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter

from api.infra.tracing import (
    DEFAULT_SERVICE_NAME,
    TracingConfigError,
    current_traceparent,
    service_resource,
    span_context_of,
    span_exporters,
)
from api.server.spans import with_stable_http
from tests.otlp_receiver import OtlpReceiver


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.names: list[str] = []

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method's name
        self.names += [
            span.name for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans
        ]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def grpc_collector() -> Iterator[tuple[str, _Collector]]:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", collector
    finally:
        server.stop(grace=None)


def export_one(exporter: SpanExporter, name: str) -> None:
    provider = TracerProvider(resource=service_resource({}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span(name):
        pass
    provider.shutdown()


def test_no_variables_export_nothing() -> None:
    assert span_exporters(None, {}) == []
    assert span_exporters(None, {"OTEL_TRACES_EXPORTER": "none"}) == []


def test_the_endpoint_shorthand_exports_over_http_to_the_traces_path() -> None:
    with OtlpReceiver() as receiver:
        [exporter] = span_exporters(receiver.endpoint + "/", {})
        assert isinstance(exporter, HttpExporter)
        export_one(exporter, "over http")
        receiver.wait_for(lambda spans: [s for s in spans if s.name == "over http"], timeout=5, what="span")
        [span] = receiver.spans()
        assert span.resource["service.name"] == DEFAULT_SERVICE_NAME


def test_grpc_protocol_exports_over_grpc(grpc_collector: tuple[str, _Collector]) -> None:
    endpoint, collector = grpc_collector
    environ = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    [exporter] = span_exporters(endpoint, environ)
    assert isinstance(exporter, GrpcExporter)
    export_one(exporter, "over grpc")
    assert collector.names == ["over grpc"]


def test_several_exporters_and_bad_names() -> None:
    kinds = {type(e) for e in span_exporters(None, {"OTEL_TRACES_EXPORTER": "otlp, console"})}
    assert kinds == {HttpExporter, ConsoleSpanExporter}
    with pytest.raises(TracingConfigError, match="'zipkin' is not supported"):
        span_exporters(None, {"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TracingConfigError, match="'http/json' is not supported"):
        span_exporters(None, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, DEFAULT_SERVICE_NAME),
        ({"OTEL_SERVICE_NAME": "vm-host-3"}, "vm-host-3"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=lab,team=infra"}, "lab"),
    ],
)
def test_service_name_defaults_to_tofu_qemu_unless_set(environ: dict[str, str], expected: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environ.items():
            patch.setenv(name, value)
        assert service_resource(environ).attributes["service.name"] == expected


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, "rack1-node2"), ({"OTEL_RESOURCE_ATTRIBUTES": "host.name=set-by-operator"}, "set-by-operator")],
)
def test_a_controllers_spans_carry_its_host_name(environ: dict[str, str], expected: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environ.items():
            patch.setenv(name, value)
        resource = service_resource(environ, host_name="rack1-node2")
        assert resource.attributes["host.name"] == expected
    assert "host.name" not in service_resource({}).attributes


def test_a_stored_traceparent_round_trips_to_a_link_target() -> None:
    provider = TracerProvider()
    with provider.get_tracer("test").start_as_current_span("write") as span:
        stored = current_traceparent()
    assert stored is not None
    context = span_context_of(stored)
    assert context is not None
    assert (context.trace_id, context.span_id) == (
        span.get_span_context().trace_id,
        span.get_span_context().span_id,
    )
    assert span_context_of(None) is None
    assert span_context_of("garbage") is None


@pytest.mark.parametrize(
    ("given", "wanted"),
    [
        pytest.param("", "http", id="unset"),
        pytest.param("database", "database,http", id="other-signal"),
        pytest.param("http", "http", id="http"),
        pytest.param(" http/dup , database", "http/dup,database", id="dup-kept"),
    ],
)
def test_server_spans_use_the_stable_http_conventions(given: str, wanted: str) -> None:
    """OTEL_SEMCONV_STABILITY_OPT_IN always selects the stable HTTP attributes; an operator's
    http/dup (old and new side by side) and other signals are kept."""
    assert with_stable_http(given) == wanted
