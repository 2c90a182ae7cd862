"""Trace links through the real app: with `trace_url_template` set, the events API carries each
event's traceUrl and the dashboard's VM and project pages link the trace id (escaped, opened in a
new tab without opener or referrer); unset, the API says null and the page offers a Copy button."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.server.keys import DATABASE, VMS
from api.settings import ServerSettings
from api.store.events import EventLog, NewEvent
from api.testing.tfstate import encode, vm_state
from tests.component.conftest import AUTH

Client = TestClient[Any, Any]
MakeClient = Callable[[ServerSettings], Awaitable[Client]]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
NOT_A_TRACE_ID = '"><script>alert(1)</script>'
# The & must reach the page as &amp; inside href.
TEMPLATE = "http://127.0.0.1:16686/trace/{trace_id}?uiEmbed=v0&x=1"
LINK = f"http://127.0.0.1:16686/trace/{TRACE_ID}?uiEmbed=v0&x=1"
K8S = "/apis/tofu-qemu.dev/v1alpha1/projects/lab"


class Elements(HTMLParser):
    """The attributes of every <a> and <button> of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.found: dict[str, list[dict[str, str | None]]] = {"a": [], "button": []}
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.found:
            self.found[tag].append(dict(attrs))


async def lab(make_client: MakeClient, tmp_path: Path, template: str | None) -> Client:
    """Project lab with VM web, which has an event with a trace id and one with a hostile id,
    and a project event (vm_name "") with a trace id."""
    settings = ServerSettings(data_dir=tmp_path / "server", trace_url_template=template)
    client = await make_client(settings)
    assert (
        await client.post("/state/lab", data=encode(vm_state(1, {"web": {}})), headers=AUTH)
    ).status == 200
    uid = (await client.app[VMS].get("lab", "web")).uid
    events = EventLog(client.app[DATABASE])
    await events.record(NewEvent(uid, "lab", "web", "Started", "traced", trace_id=TRACE_ID))
    await events.record(NewEvent(uid, "lab", "web", "Odd", "hostile id", trace_id=NOT_A_TRACE_ID))
    await events.record(NewEvent("", "lab", "", "ForceUnlocked", "traced too", trace_id=TRACE_ID))
    return client


async def get(client: Client, path: str) -> Any:
    response = await client.get(path, headers=AUTH)
    assert response.status == 200, await response.text()
    return await response.json() if response.content_type == "application/json" else await response.text()


# The events this file records itself. The state POST records Created too, with a trace id when
# an earlier test of the session left a recording tracer provider installed.
OURS = ("Started", "Odd", "ForceUnlocked")


def trace_fields(body: Any) -> dict[str, tuple[str | None, str | None]]:
    return {e["reason"]: (e["traceId"], e["traceUrl"]) for e in body["items"] if e["reason"] in OURS}


async def test_the_events_api_carries_the_link_for_valid_ids_only(
    make_client: MakeClient, tmp_path: Path
) -> None:
    client = await lab(make_client, tmp_path, TEMPLATE)
    assert trace_fields(await get(client, f"{K8S}/qemuvms/web/events")) == {
        "Started": (TRACE_ID, LINK),
        "Odd": (NOT_A_TRACE_ID, None),
    }
    assert trace_fields(await get(client, f"{K8S}/events"))["ForceUnlocked"] == (TRACE_ID, LINK)


async def test_without_a_template_the_api_has_no_link(make_client: MakeClient, tmp_path: Path) -> None:
    client = await lab(make_client, tmp_path, None)
    assert trace_fields(await get(client, f"{K8S}/qemuvms/web/events"))["Started"] == (TRACE_ID, None)


@pytest.mark.parametrize("path", ["/ui/projects/lab/vms/web", "/ui/projects/lab"])
async def test_dashboard_pages_link_the_trace_in_a_new_tab(
    make_client: MakeClient, tmp_path: Path, path: str
) -> None:
    text = await get(await lab(make_client, tmp_path, TEMPLATE), path)
    links = [a for a in Elements(text).found["a"] if a.get("class") == "trace"]
    ours = [a for a in links if TRACE_ID in (a.get("href") or "")]
    assert ours == [{"class": "trace", "href": LINK, "rel": "noopener noreferrer", "target": "_blank"}], links
    assert all((a["rel"], a["target"]) == ("noopener noreferrer", "_blank") for a in links), links
    assert LINK.replace("&", "&amp;") in text
    assert NOT_A_TRACE_ID not in text
    # Only the id that is no trace id stays unlinked, with its Copy button.
    copies = [b["data-copy"] for b in Elements(text).found["button"] if b.get("class") == "copy"]
    assert TRACE_ID not in copies


async def test_without_a_template_the_page_offers_a_copy_button(
    make_client: MakeClient, tmp_path: Path
) -> None:
    text = await get(await lab(make_client, tmp_path, None), "/ui/projects/lab/vms/web")
    elements = Elements(text)
    assert not [a for a in elements.found["a"] if a.get("class") == "trace"]
    copies = [b["data-copy"] for b in elements.found["button"] if b.get("class") == "copy"]
    assert [copy for copy in copies if copy in (TRACE_ID, NOT_A_TRACE_ID)] == [TRACE_ID, NOT_A_TRACE_ID], (
        copies
    )
    assert NOT_A_TRACE_ID not in text
