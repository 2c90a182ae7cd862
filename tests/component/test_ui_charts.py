"""The dashboard's pictures over HTTP (aiohttp test client, real store): the overview on /ui and
its fragment route, a VM page's charts and their fragment route, from stored usage hours and
minutes, the sampler's cursors, a registered host and the event log. Hostile event text stays
text; the fragments carry the UI's security headers and need credentials like the pages."""

from __future__ import annotations

import re
import socket
from datetime import timedelta

import pytest

from api.hosts import Resources
from api.server.keys import DATABASE, VMS
from api.server.ui import SECURITY_HEADERS
from api.server.ui_charts import FRAGMENT_REFRESH_MS, OVERVIEW_URL, TIMELINE_EVENTS
from api.store import usage_recent
from api.store.events import EventLog, NewEvent
from api.store.hosts import Hosts, Registration
from api.store.usage import UsageStore
from api.usage import Cursor, HourUsage, MinuteUsage, Usage
from tests.component.test_ui import SCRIPT, Client, assert_no_raw_markup, page, ui  # noqa: F401 - ui: fixture

MIB = 1024 * 1024
CHARTS_URL = "/ui/projects/lab/vms/web/charts"


async def _measure_web(client: Client) -> str:
    """An hour of `web` at half a core and 100 MiB (its two minutes before now, 12:00, at half a
    core and 100 then 50 MiB), its last sample at 150 MiB RSS, its restart events (one with
    markup in its message), and this machine registered as its host."""
    db = client.app[DATABASE]
    uid = (await client.app[VMS].get("lab", "web")).uid
    hour = db.clock().replace(minute=0, second=0, microsecond=0)
    row = HourUsage(uid, "lab", "web", hour, Usage(60.0, 100 * 120.0, 120.0), disk_bytes=20 * MIB)
    minutes = [
        MinuteUsage(uid, "lab", "web", hour - timedelta(minutes=2), Usage(30.0, 100 * 60.0, 60.0)),
        MinuteUsage(uid, "lab", "web", hour - timedelta(minutes=1), Usage(30.0, 50 * 60.0, 60.0)),
    ]
    await UsageStore(db).record([row], {uid: Cursor(4242, 1, 6000, 150 * MIB, 0.0)}, minutes=minutes)
    log = EventLog(db)
    for reason, message in (("Started", "QEMU started"), ("Restarted", f"restart 1 {SCRIPT}")):
        await log.record(NewEvent(uid, "lab", "web", reason, message))
    here = socket.gethostname().lower()
    await Hosts(db).register(Registration(here, {}, Resources(cpus=4, memory_mib=4096, ports=100), 15.0))
    return here


async def test_the_overview_counts_phases_draws_host_capacity_and_the_busiest_vms(ui: Client) -> None:  # noqa: F811
    host = await _measure_web(ui)
    text = await page(ui, "/ui")
    overview = text[text.index('<section id="overview"') : text.index("</section>")]
    assert f'data-fragment="{OVERVIEW_URL}" data-refresh-ms="{FRAGMENT_REFRESH_MS}"' in overview
    assert re.findall(r'<li data-phase="(\w+)" data-count="(\d+)">', overview) == [
        ("Running", "1"),
        ("Pending", "1"),
    ]
    assert f'<tr data-host="{host}">' in overview
    assert "0 of 4 vCPUs" in overview  # no VM is placed on it in this store
    assert "0 of 4096 MiB" in overview
    assert "0 of 100 ports" in overview
    assert re.search(r'<td data-col="disk"><svg class="meter"', overview) is None, "no VM disk on it yet"
    top_cpu = overview[overview.index('id="top-cpu"') : overview.index('id="top-memory"')]
    assert 'data-vm="lab/web"' in top_cpu
    assert "0.50 cores" in top_cpu
    assert "150 MiB" in overview[overview.index('id="top-memory"') :], "memory now is the last sample's RSS"
    assert_no_raw_markup(text)


async def test_the_vm_page_charts_an_hour_and_a_day_and_the_restart(ui: Client) -> None:  # noqa: F811
    await _measure_web(ui)
    text = await page(ui, "/ui/projects/lab/vms/web")
    charts = text[text.index('<section id="charts"') :]
    assert f'data-fragment="{CHARTS_URL}"' in charts
    # The last hour: a bar a minute; the last day: both minutes in the quarter hour from 11:45.
    for window, bars, latest, memory in (
        ("hour", 2, "the minute from 11:59 UTC", 50),
        ("day", 1, "the 15 minutes from 11:45 UTC", 75),
    ):
        cpu = charts[charts.index(f'id="cpu-{window}"') :]
        assert f'data-samples="{bars}"' in cpu[: cpu.index("</figure>")]
        assert f"latest 0.50 cores (mean of {latest})" in cpu[: cpu.index("</figure>")]
        mem = charts[charts.index(f'id="memory-{window}"') :]
        assert f"latest {memory} MiB (mean of {latest})" in mem[: mem.index("</figure>")]
        line = charts[charts.index(f'id="timeline-{window}"') :]
        assert 'data-restarts="1"' in line[: line.index("</figure>")]
    assert "restart 1 &lt;script&gt;" in charts
    assert_no_raw_markup(text)
    assert (await page(ui, "/ui/projects/lab/vms/db")).count('data-samples="0"') == 4, "db has no usage"


async def test_the_fragments_are_the_sections_alone_with_the_ui_headers_and_auth(ui: Client) -> None:  # noqa: F811
    await _measure_web(ui)
    for url, section in ((OVERVIEW_URL, "overview"), (CHARTS_URL, "charts")):
        answer = await ui.get(url, headers={"Authorization": "Bearer tok-1"})
        assert answer.status == 200
        text = await answer.text()
        assert text.startswith(f'<section id="{section}"')
        assert "<script" not in text
        for name, value in SECURITY_HEADERS.items():
            assert answer.headers[name] == value
        assert answer.headers["Cache-Control"] == "no-store"
        assert (await ui.get(url)).status == 401
    missing = await ui.get("/ui/projects/lab/vms/nope/charts", headers={"Authorization": "Bearer tok-1"})
    assert missing.status == 404
    assert (await missing.json())["kind"] == "Status"


async def test_too_many_usage_rows_leave_the_cpu_list_empty_not_the_page_broken(
    ui: Client,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await _measure_web(ui)
    monkeypatch.setattr(usage_recent, "ROWS_MAX", 0)
    text = await page(ui, "/ui")
    top_cpu = text[text.index('id="top-cpu"') : text.index('id="top-memory"')]
    assert "Nothing measured yet." in top_cpu
    assert "150 MiB" in text[text.index('id="top-memory"') :], "memory comes from the sampler's cursor"


def test_a_timeline_reads_at_most_500_events() -> None:
    assert TIMELINE_EVENTS == 500
    assert FRAGMENT_REFRESH_MS == 10_000
