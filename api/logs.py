"""structlog set-up: JSON lines when not on a TTY, readable console output on one."""

from __future__ import annotations

import logging
import sys
from typing import TextIO, cast

import structlog

from api.settings import LogFormat


def configure_logging(log_format: LogFormat, level: str) -> None:
    use_console = log_format is LogFormat.CONSOLE or (log_format is LogFormat.AUTO and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=cast("TextIO", _CurrentStderr())),
        cache_logger_on_first_use=True,
    )
    # aiohttp's access log goes through stdlib logging; keep it quiet unless debugging.
    logging.basicConfig(level=logging.WARNING if numeric_level > logging.DEBUG else logging.DEBUG)


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time, not the stream bound at configuration
    (test runners and daemons swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
