"""A real OTLP/HTTP trace receiver on loopback, for tests that check the spans a process exports.

It speaks the binary protobuf encoding of OTLP/HTTP (spec: "OTLP/HTTP Request", path
`/v1/traces`, `Content-Type: application/x-protobuf`, optional `Content-Encoding: gzip` or
`deflate`) and answers 200 with an empty `ExportTraceServiceResponse`, as a collector does. The
JSON encoding is not served: the SDK exporters this project uses send protobuf only.

The server runs in a daemon thread, so it works the same for a test that drives the app
in-process and for one that points a child process at `endpoint`. Received spans are decoded
into frozen dataclasses holding plain Python values, so assertions never touch protobuf
objects. Ids are lowercase hex, as in the W3C `traceparent` header and the console exporter.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self, TypeVar

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

T = TypeVar("T")

TRACES_PATH = "/v1/traces"
_PROTOBUF = "application/x-protobuf"
_POLL_SECONDS = 0.02
_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "identity": lambda body: body,
    "gzip": gzip.decompress,
    "deflate": zlib.decompress,
}


@dataclass(frozen=True, slots=True)
class ReceivedLink:
    """A link from a received span to another span, possibly in another trace."""

    trace_id: str
    span_id: str
    attributes: dict[str, object]


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """A timestamped event recorded on a received span."""

    name: str
    time_ns: int
    attributes: dict[str, object]


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One span as the collector saw it.

    `kind` and `status_code` keep OTLP's numbering, which is not the Python API's: kind
    1 = internal, 2 = server, 3 = client, 4 = producer, 5 = consumer; status 0 = unset,
    1 = ok, 2 = error. Array attribute values are tuples, as the SDK stores them.
    """

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, object]
    links: tuple[ReceivedLink, ...]
    events: tuple[ReceivedEvent, ...]
    status_code: int
    status_message: str
    resource: dict[str, object]
    scope: str

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


class OtlpReceiver:
    """An OTLP/HTTP trace collector on 127.0.0.1 with an ephemeral port; close() or use `with`.

    `fail_with`, when set, is the HTTP status every request gets instead of being stored, to
    test behaviour against a failing collector. It may be reassigned while running (a
    collector that comes back).
    """

    def __init__(self, *, fail_with: int | None = None) -> None:
        self.fail_with = fail_with
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._requests = 0
        self._closed = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-receiver",
            daemon=True,
        )
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        """The base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` wants it (the SDK appends the path)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def traces_url(self) -> str:
        """The full signal URL, as `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` and the exporters want it."""
        return self.endpoint + TRACES_PATH

    @property
    def requests(self) -> int:
        """How many HTTP requests arrived, whatever their outcome."""
        with self._lock:
            return self._requests

    def spans(self) -> list[ReceivedSpan]:
        """A snapshot of every span stored so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], T | None], *, timeout: float, what: str
    ) -> T:
        """Poll `predicate` on snapshots until it returns something truthy, and return that.

        A falsy result counts as "not yet", not only None, so `lambda s: find(s, "x")` waits
        for a span instead of returning an empty list at once. This blocks the calling thread:
        from a coroutine whose spans end on the same event loop, use `wait_for_async`.

        :raise AssertionError: `timeout` seconds passed; the message names `what` and the spans
            that did arrive.
        """
        deadline = time.monotonic() + timeout
        while (result := self._poll(predicate, deadline, timeout, what)) is None:
            time.sleep(_POLL_SECONDS)
        return result

    # ASYNC109: an own deadline rather than asyncio.timeout, so that the failure can say which
    # spans did arrive. ASYNC110: spans land on the server's thread; polling a snapshot is
    # simpler than handing each arrival over to the loop, and 20 ms is fine for a test.
    async def wait_for_async(
        self,
        predicate: Callable[[list[ReceivedSpan]], T | None],
        *,
        timeout: float,  # noqa: ASYNC109
        what: str,
    ) -> T:
        """`wait_for` that sleeps on the event loop, so the app under test keeps running.

        :raise AssertionError: as `wait_for`.
        """
        deadline = time.monotonic() + timeout
        while (result := self._poll(predicate, deadline, timeout, what)) is None:  # noqa: ASYNC110
            await asyncio.sleep(_POLL_SECONDS)
        return result

    def _poll(
        self, predicate: Callable[[list[ReceivedSpan]], T | None], deadline: float, timeout: float, what: str
    ) -> T | None:
        spans = self.spans()
        result = predicate(spans)
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; "
                f"{self.requests} requests, {len(spans)} spans: {summarize(spans)}"
            )
        return None

    def close(self) -> None:
        """Stop serving and free the port; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _count_request(self) -> int | None:
        with self._lock:
            self._requests += 1
            return self.fail_with

    def _store(self, spans: Iterable[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)


def find(spans: Iterable[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    """The spans called `name`, in start order."""
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_ns)


def children_of(spans: Iterable[ReceivedSpan], span: ReceivedSpan) -> list[ReceivedSpan]:
    """The direct children of `span`, in start order."""
    return sorted(
        (s for s in spans if s.trace_id == span.trace_id and s.parent_span_id == span.span_id),
        key=lambda s: s.start_ns,
    )


def by_id(spans: Iterable[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    """The spans keyed by span id."""
    return {s.span_id: s for s in spans}


def summarize(spans: Sequence[ReceivedSpan]) -> str:
    """Span names with counts, for failure messages."""
    if not spans:
        return "(none)"
    return ", ".join(f"{name} ×{n}" if n > 1 else name for name, n in Counter(s.name for s in spans).items())


def decode_request(body: bytes) -> list[ReceivedSpan]:
    """The spans in one serialized `ExportTraceServiceRequest`.

    :raise ValueError: the body is not such a message.
    """
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    # google.protobuf ships no type stubs here, so its DecodeError cannot be named under mypy
    # --strict; only the parse is inside this try, so nothing else is swallowed.
    except Exception as err:
        raise ValueError(f"not an ExportTraceServiceRequest: {err}") from err
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        name=span.name,
                        kind=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_attributes(span.attributes),
                        links=tuple(
                            ReceivedLink(
                                trace_id=link.trace_id.hex(),
                                span_id=link.span_id.hex(),
                                attributes=_attributes(link.attributes),
                            )
                            for link in span.links
                        ),
                        events=tuple(
                            ReceivedEvent(
                                name=event.name,
                                time_ns=event.time_unix_nano,
                                attributes=_attributes(event.attributes),
                            )
                            for event in span.events
                        ),
                        status_code=span.status.code,
                        status_message=span.status.message,
                        resource=resource,
                        scope=scope_spans.scope.name,
                    )
                )
    return spans


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, object]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> object:
    match value.WhichOneof("value"):
        case "string_value":
            return value.string_value
        case "bool_value":
            return value.bool_value
        case "int_value":
            return value.int_value
        case "double_value":
            return value.double_value
        case "bytes_value":
            return value.bytes_value
        case "array_value":
            return tuple(_value(item) for item in value.array_value.values)
        case "kvlist_value":
            return _attributes(value.kvlist_value.values)
        case _:
            return None


def _handler_for(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            # The body is read before any answer: closing with unread data makes the client see
            # a reset instead of the status this receiver means to send.
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fail_with = receiver._count_request()
            if self.path.split("?", 1)[0] != TRACES_PATH:
                self._reply_text(HTTPStatus.NOT_FOUND, f"only {TRACES_PATH} is served")
                return
            content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            if content_type != _PROTOBUF:
                self._reply_text(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"only {_PROTOBUF} is served")
                return
            if fail_with is not None:
                self._reply_text(fail_with, "failing on purpose")
                return
            encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
            if encoding not in _DECOMPRESS:
                self._reply_text(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"unsupported encoding {encoding}")
                return
            try:
                spans = decode_request(_DECOMPRESS[encoding](body))
            # gzip raises BadGzipFile (an OSError) or EOFError, zlib its own error.
            except (ValueError, OSError, EOFError, zlib.error) as err:
                self._reply_text(HTTPStatus.BAD_REQUEST, str(err))
                return
            receiver._store(spans)
            self._reply(HTTPStatus.OK, _PROTOBUF, ExportTraceServiceResponse().SerializeToString())

        def _reply_text(self, status: int, text: str) -> None:
            self._reply(status, "text/plain; charset=utf-8", text.encode() + b"\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Per-request lines on stderr would bury the test's own output.
            pass

    return Handler
