"""The dashboard's pictures: the fleet overview on /ui and a VM page's usage charts and timeline.

Each is one server-rendered <section> (HTML with inline SVG, api/overview.py and
api/vm_charts.py) that the page shows on its first paint and that the script (fragments.js)
replaces with a fresh copy from its fragment route: when the watch reports a change, and every
FRAGMENT_REFRESH_MS for the usage figures, which change without one. The fragment routes are
GETs under /ui with the same auth and headers as the pages; the script parses their answers with
DOMParser (inert: nothing in them runs, and the CSP forbids inline script anyway).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import Sequence
from datetime import timedelta

import structlog
from aiohttp import web

from api.overview import HostDisk, disk_by_host, overview_section, vms_now
from api.server.cluster import host_documents
from api.server.events import event_log_of
from api.server.keys import DATABASE, SETTINGS
from api.server.ui_pages import vm_href
from api.store.hosts import Hosts
from api.store.usage import TooManyRows, UsageStore
from api.store.usage_minutes import spans
from api.store.usage_recent import recent_hours
from api.timeline import LogEntry
from api.types import QemuVM
from api.usage import HourUsage
from api.vm_charts import WINDOWS, charts_section

log = structlog.get_logger(__name__)
# Usage is sampled every usage_sample_seconds (15 s by default): refreshing faster shows nothing new.
FRAGMENT_REFRESH_MS = 10_000
OVERVIEW_URL = "/ui/fragments/overview"
# The newest events a timeline reads: a day of an ordinary VM's life is far fewer.
TIMELINE_EVENTS = 500


async def overview_html(request: web.Request, vms: Sequence[QemuVM]) -> str:
    db = request.app[DATABASE]
    now = db.clock()
    hosts = list((await host_documents(Hosts(db), request)).values())
    try:
        hours = await recent_hours(db, now - timedelta(hours=1))
    except TooManyRows as err:
        # Thousands of VMs: the CPU list is left empty rather than the page failing.
        log.warning("overview_usage_skipped", reason=str(err))
        hours = []
    cursors = await UsageStore(db).cursors()
    rss = {uid: cursor.rss_bytes for uid, cursor in cursors.items()}
    disks = await _host_disks(request, vms, hours)
    return overview_section(
        vms, hosts, disks, vms_now(vms, hours, rss), fragment_url=OVERVIEW_URL, refresh_ms=FRAGMENT_REFRESH_MS
    )


async def _host_disks(
    request: web.Request, vms: Sequence[QemuVM], hours: Sequence[HourUsage]
) -> dict[str, HostDisk]:
    """Each host's VM disk bytes; the size of the filesystem of data_dir for this machine only
    (the host named as the controller names it by default), as no other machine's is known here."""
    latest = {row.uid: row.disk_bytes for row in hours}  # rows are oldest first per uid
    used = disk_by_host(vms, latest)
    here = socket.gethostname().lower()
    size = await asyncio.to_thread(_filesystem_size, request.app[SETTINGS].data_dir)
    return {host: HostDisk(bytes_, size if host == here else None) for host, bytes_ in used.items()}


def _filesystem_size(path: object) -> int | None:
    try:
        return shutil.disk_usage(str(path)).total
    except OSError:
        return None


async def vm_charts_html(request: web.Request, vm: QemuVM) -> str:
    """The VM's charts: each window reads its bars, summed from the minutes (60 + 96 rows)."""
    project, name, db = vm.metadata.project, vm.metadata.name, request.app[DATABASE]
    now = db.clock()
    usage = {
        window.key: await spans(db, project, name, now, step=window.step, count=window.bars)
        for window in WINDOWS
    }
    events = await event_log_of(request.app).list(project=project, vm_name=name, limit=TIMELINE_EVENTS)
    entries = [LogEntry(e.time, e.reason, e.message) for e in events]
    url = f"{vm_href(project, name)}/charts"
    return charts_section(usage, entries, now, fragment_url=url, refresh_ms=FRAGMENT_REFRESH_MS)
