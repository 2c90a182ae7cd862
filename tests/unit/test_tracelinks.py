"""trace_url_template: what the setting accepts, and the link made from it (api/tracelinks.py)."""

from __future__ import annotations

import re

import pytest

from api.infra.settings import SettingsError, load_settings
from api.settings import ServerSettings
from api.tracelinks import check_trace_url_template, trace_url

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
JAEGER = "http://jaeger:16686/trace/{trace_id}"
# Grafana's explore URL carries JSON: its braces are percent-encoded, only the placeholder is not.
TEMPO = "https://grafana.example/explore?left=%7B%22queries%22:%5B%7B%22query%22:%22{trace_id}%22%7D%5D%7D"


def test_the_setting_is_unset_by_default() -> None:
    assert ServerSettings().trace_url_template is None


@pytest.mark.parametrize("template", [JAEGER, TEMPO, "https://[::1]:16686/trace/{trace_id}?a={trace_id}"])
def test_http_templates_naming_only_trace_id_are_accepted(template: str) -> None:
    assert check_trace_url_template(template) == template
    settings = load_settings(ServerSettings, flags={}, env={"TOFU_QEMU_TRACE_URL_TEMPLATE": template})
    assert settings.trace_url_template == template


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("http://jaeger:16686/trace/", "must contain {trace_id}"),
        ("http://jaeger/{trace_id}/{span_id}", "only {trace_id}"),
        ('http://grafana/explore?left={"q":"{trace_id}"}', "only {trace_id}"),
        ("http://jaeger/{trace_id", "must contain {trace_id}"),
        ("javascript:alert(1)//{trace_id}", "http:// or https://"),
        ("data:text/html,{trace_id}", "http:// or https://"),
        ("ftp://jaeger/{trace_id}", "http:// or https://"),
        ("//jaeger/{trace_id}", "http:// or https://"),
        ("http:///trace/{trace_id}", "with a host"),
        ('http://jaeger/"><script>{trace_id}', "must not contain"),
        ("http://jaeger/ trace/{trace_id}", "must not contain"),
        ("http://jaeger/\ntrace/{trace_id}", "must not contain"),
    ],
)
def test_other_templates_are_refused_saying_why(template: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        check_trace_url_template(template)
    with pytest.raises(SettingsError, match="trace_url_template"):
        load_settings(ServerSettings, flags={"trace_url_template": template}, env={})


def test_the_trace_id_takes_the_placeholders_place() -> None:
    assert trace_url(JAEGER, TRACE_ID) == f"http://jaeger:16686/trace/{TRACE_ID}"
    assert trace_url(TEMPO, TRACE_ID) == TEMPO.replace("{trace_id}", TRACE_ID)
    assert trace_url("http://j/{trace_id}/{trace_id}", TRACE_ID) == f"http://j/{TRACE_ID}/{TRACE_ID}"


@pytest.mark.parametrize(
    "trace_id",
    [
        None,
        "",
        TRACE_ID.upper(),
        TRACE_ID[:-1],
        TRACE_ID + "0",
        "../../admin" + TRACE_ID[11:],
        TRACE_ID[:-1] + "g",
        TRACE_ID[:-1] + "\n",
        '"><script>alert(1)</script>',
    ],
)
def test_anything_but_32_lowercase_hex_digits_gets_no_link(trace_id: str | None) -> None:
    assert trace_url(JAEGER, trace_id) is None


def test_without_a_template_there_is_no_link() -> None:
    assert trace_url(None, TRACE_ID) is None
