"""Trace links: `trace_url_template` (a Jaeger or Tempo URL with `{trace_id}`) made into the URL
of one trace. Pure.

The template comes from the operator, the trace id from the event log; neither may turn a link
into something else. The template must be http(s) with a host and name only `{trace_id}` (any
other brace, such as the JSON of a Grafana explore URL, is written percent-encoded), and an id
is substituted only when it is 32 lowercase hex digits, percent-encoded on the way in.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit

PLACEHOLDER = "{trace_id}"
TRACE_ID_RE = re.compile(r"[0-9a-f]{32}")
_UNSAFE_RE = re.compile(r"[\x00-\x20\x7f<>\"'\\`]")


def check_trace_url_template(template: str) -> str:
    """`template` if it is a usable trace URL template. :raise ValueError: saying why not."""
    if PLACEHOLDER not in template:
        raise ValueError(f"must contain {PLACEHOLDER}")
    rest = template.replace(PLACEHOLDER, "")
    if "{" in rest or "}" in rest:
        raise ValueError(f"may name only {PLACEHOLDER}; write other braces as %7B and %7D")
    if _UNSAFE_RE.search(template):
        raise ValueError("must not contain spaces, quotes, <, >, \\ or control characters")
    parts = urlsplit(rest)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return template


def trace_url(template: str | None, trace_id: str | None) -> str | None:
    """The link to trace `trace_id`, or None when there is no template or the id is not a
    W3C trace id (32 lowercase hex digits)."""
    if template is None or trace_id is None or not TRACE_ID_RE.fullmatch(trace_id):
        return None
    return template.replace(PLACEHOLDER, quote(trace_id, safe=""))
