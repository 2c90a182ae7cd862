"""The OTLP test receiver decodes what the real SDK exporter sends, plain and gzipped."""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.otlp_receiver import OtlpReceiver, by_id, children_of, find

# Small so a broken receiver fails the test in seconds; loopback answers in milliseconds.
EXPORT_TIMEOUT = 2.0
SERVICE = "otlp-receiver-test"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def provider_for(receiver: OtlpReceiver, compression: Compression | None = None) -> TracerProvider:
    # A private provider: the global one belongs to the code under test elsewhere.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: SERVICE}))
    exporter = OTLPSpanExporter(endpoint=receiver.traces_url, timeout=EXPORT_TIMEOUT, compression=compression)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def test_decodes_a_tree_with_links_events_and_status(receiver: OtlpReceiver) -> None:
    """Ids, parentage, typed attributes, links, events, status and resource survive the trip."""
    provider = provider_for(receiver)
    tracer = provider.get_tracer("tests.scope")
    with (
        tracer.start_as_current_span(
            "parent",
            kind=trace.SpanKind.SERVER,
            attributes={"s": "text", "b": True, "i": 42, "f": 1.5, "arr": ["x", "y"], "ints": [1, 2]},
        ) as parent,
        tracer.start_as_current_span("child", attributes={"n": 1}),
    ):
        pass
    with tracer.start_as_current_span(
        "linked", links=[trace.Link(parent.get_span_context(), {"why": "caused"})]
    ) as linked:
        linked.add_event("boom", {"code": 7})
        linked.set_status(trace.Status(trace.StatusCode.ERROR, "it broke"))
    assert provider.force_flush()
    provider.shutdown()

    spans = receiver.spans()
    assert sorted(s.name for s in spans) == ["child", "linked", "parent"]
    (p,) = find(spans, "parent")
    (c,) = find(spans, "child")
    (link_span,) = find(spans, "linked")
    context = parent.get_span_context()
    assert p.trace_id == trace.format_trace_id(context.trace_id)
    assert p.span_id == trace.format_span_id(context.span_id)
    assert p.parent_span_id is None
    assert p.kind == 2  # OTLP SPAN_KIND_SERVER
    assert p.attributes == {"s": "text", "b": True, "i": 42, "f": 1.5, "arr": ("x", "y"), "ints": (1, 2)}
    assert p.resource["service.name"] == SERVICE
    assert p.scope == "tests.scope"
    assert p.status_code == 0
    assert 0 <= p.duration_ms < 5000
    assert children_of(spans, p) == [c]
    assert (c.trace_id, c.parent_span_id, c.attributes) == (p.trace_id, p.span_id, {"n": 1})
    assert by_id(spans)[c.span_id] is c

    assert link_span.trace_id != p.trace_id
    assert link_span.parent_span_id is None
    (link,) = link_span.links
    assert (link.trace_id, link.span_id, link.attributes) == (p.trace_id, p.span_id, {"why": "caused"})
    (event,) = link_span.events
    assert (event.name, event.attributes) == ("boom", {"code": 7})
    assert link_span.start_ns <= event.time_ns <= link_span.end_ns
    assert (link_span.status_code, link_span.status_message) == (2, "it broke")
    assert receiver.requests == 3


def test_decodes_gzipped_requests(receiver: OtlpReceiver) -> None:
    """A gzip-compressing exporter is understood as well as a plain one."""
    provider = provider_for(receiver, Compression.Gzip)
    with provider.get_tracer("tests").start_as_current_span("zipped", attributes={"k": "v"}):
        pass
    provider.shutdown()

    (span,) = receiver.wait_for(lambda spans: find(spans, "zipped"), timeout=5, what="the zipped span")
    assert span.attributes == {"k": "v"}


def test_failing_collector_stores_nothing_and_the_exporter_reports_failure() -> None:
    """With fail_with=503 the exporter gets a failure result, not an exception, and nothing is kept."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("tests").start_as_current_span("lost"):
        pass

    with OtlpReceiver(fail_with=503) as receiver:
        # 503 is retryable; a timeout below the first backoff (about 1 s) means one attempt only.
        exporter = OTLPSpanExporter(endpoint=receiver.traces_url, timeout=0.5)
        assert exporter.export(memory.get_finished_spans()) is SpanExportResult.FAILURE
        assert receiver.requests == 1
        assert receiver.spans() == []


def test_wait_for_times_out_naming_what_arrived(receiver: OtlpReceiver) -> None:
    """A timed-out wait says what it waited for and which spans did arrive."""
    provider = provider_for(receiver)
    with provider.get_tracer("tests").start_as_current_span("present"):
        pass
    provider.shutdown()

    with pytest.raises(AssertionError, match=r"waiting for the absent span; 1 requests, 1 spans: present"):
        receiver.wait_for(lambda spans: find(spans, "absent"), timeout=0.1, what="the absent span")
    receiver.clear()
    assert receiver.spans() == []


async def test_wait_for_async_lets_the_loop_run(receiver: OtlpReceiver) -> None:
    """The async wait keeps the event loop turning, so a span ended by a task still arrives."""
    provider = provider_for(receiver)

    async def work() -> None:
        with provider.get_tracer("tests").start_as_current_span("in a task"):
            await asyncio.sleep(0.05)

    task = asyncio.create_task(work())
    (span,) = await receiver.wait_for_async(
        lambda spans: find(spans, "in a task"), timeout=5, what="the span"
    )
    await task
    provider.shutdown()
    assert span.duration_ms >= 50


@pytest.mark.parametrize(
    ("path", "content_type", "status"),
    [
        ("/v1/metrics", "application/x-protobuf", 404),
        ("/v1/traces", "application/json", 415),
    ],
    ids=["wrong-path", "json"],
)
def test_refuses_what_it_does_not_serve(
    receiver: OtlpReceiver, path: str, content_type: str, status: int
) -> None:
    """Other paths and encodings are refused with a status, and nothing is stored."""
    host, port = receiver.endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("POST", path, body=b"{}", headers={"Content-Type": content_type})
        assert conn.getresponse().status == status
    finally:
        conn.close()
    assert receiver.spans() == []
