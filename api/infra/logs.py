"""structlog set-up: JSON lines when not on a TTY, readable console output on one.

Every line written while a span is current (inside a reconcile, a request) carries its
`trace_id` and `span_id`, so a log search and a trace view meet. Lines from libraries that use
the standard `logging` module (aiohttp, the OTLP exporter) are rendered the same way, so a JSON
log stays JSON.

A controller's lines also carry its `host` (docs/multi-host.md), every one of them from the
first: several hosts' logs shipped to one place stay apart.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import TextIO, cast

import structlog
from opentelemetry import trace

from api.infra.settings import LogFormat


def configure_logging(log_format: LogFormat, level: str, *, host_name: str | None = None) -> None:
    """`host_name`: a controller's host, as the field `host` of every line (when the line does
    not set `host` itself)."""
    use_console = log_format is LogFormat.CONSOLE or (log_format is LogFormat.AUTO and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_context,
    ]
    if host_name is not None:
        shared.append(StaticFields({"host": host_name}))
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=cast("TextIO", _CurrentStderr())),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(cast("TextIO", _CurrentStderr()))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # aiohttp's access log goes through stdlib logging; keep it quiet unless debugging.
    root.setLevel(logging.WARNING if numeric_level > logging.DEBUG else logging.DEBUG)


def add_trace_context(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Add the current span's ids, in the hex form Jaeger and Tempo search by."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


class StaticFields:
    """Fields every line carries, unless the line sets them itself."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self._fields = dict(fields)

    def __call__(
        self, _logger: object, _method: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        for key, value in self._fields.items():
            event_dict.setdefault(key, value)
        return event_dict


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time, not the stream bound at configuration
    (test runners and daemons swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
