"""The web dashboard at /ui: server-rendered pages over the store, upgraded by a small script.

The pages read the store directly for their first paint (so they work without JavaScript);
/ui/static/app.js then lists and watches /apis/tofu-qemu.dev/v1alpha1/qemuvms to keep them live,
and sends the actions (restart, stop, start, force-unlock) to that API. Nothing here changes
anything: every /ui route is a GET. Errors (an unknown VM or project: 404, a malformed project
name: 400) are the API's JSON Status answers from the error middleware, like everywhere else.

Security: the auth middleware guards these routes like every other (a browser gets the Basic
challenge and prompts). Every UI answer carries SECURITY_HEADERS: the CSP allows this origin
only and no inline script, so even a value that escaped escaping could not run; the pages may
not be framed, so a click cannot be hijacked. Cross-site writes are refused by the same-origin
middleware (api/server/origin.py), from the browser's Origin and Sec-Fetch-Site headers. The
script's writes also carry `Content-Type: application/json` and `X-Requested-By: tofu-qemu-ui`;
the server does not check that header (the CLI and Terraform do not send it): it only makes the
request one that another site's page could send only after a CORS preflight, which this server
never approves.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from api.server import ui_charts, ui_pages
from api.server.backend import project_of
from api.server.console import NoConsoleLog, read_chunk, serial_log_path
from api.server.events import event_log_of
from api.server.keys import DATABASE, SETTINGS, STATES, VMS

STATIC_DIR = Path(__file__).with_name("ui_static")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# Pages show live data to an authenticated user: never cached by anyone.
PAGE_HEADERS = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
# The VM page's terminal (xterm.js, ui_static/terminal.js) sizes and colours itself with <style>
# elements it creates: inline styles are allowed there, and there only. Scripts stay 'self'.
VM_PAGE_HEADERS = {
    **PAGE_HEADERS,
    "Content-Security-Policy": SECURITY_HEADERS["Content-Security-Policy"]
    + "; style-src 'self' 'unsafe-inline'",
}
EVENTS_SHOWN = 50
CONSOLE_TAIL_BYTES = 16 * 1024
_CONTENT_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}


def _load_static() -> dict[str, tuple[bytes, str]]:
    """Every file of ui_static, read once: name -> (body, content type). An allow-list: a path
    that is not one of these names is 404, so nothing outside the folder can be reached."""
    files = {}
    for path in sorted(STATIC_DIR.iterdir()):
        content_type = _CONTENT_TYPES.get(path.suffix)
        if path.is_file() and content_type is not None:
            files[path.name] = (path.read_bytes(), content_type)
    return files


STATIC_FILES = _load_static()


def _page(text: str, headers: dict[str, str] = PAGE_HEADERS) -> web.Response:
    return web.Response(text=text, content_type="text/html", charset="utf-8", headers=headers)


async def vm_list(request: web.Request) -> web.StreamResponse:
    records = await request.app[VMS].list_records()
    vms = [record.to_object() for record in records]
    overview = await ui_charts.overview_html(request, vms)
    return _page(ui_pages.vm_list_page(vms, now=request.app[DATABASE].clock(), overview=overview))


async def overview_fragment(request: web.Request) -> web.StreamResponse:
    records = await request.app[VMS].list_records()
    return _page(await ui_charts.overview_html(request, [record.to_object() for record in records]))


async def vm_charts_fragment(request: web.Request) -> web.StreamResponse:
    vm = (await request.app[VMS].get(project_of(request), request.match_info["name"])).to_object()
    return _page(await ui_charts.vm_charts_html(request, vm))


async def vm_detail(request: web.Request) -> web.StreamResponse:
    project, name = project_of(request), request.match_info["name"]
    vm = (await request.app[VMS].get(project, name)).to_object()
    events = await event_log_of(request.app).list(project=project, vm_name=name, limit=EVENTS_SHOWN)
    console = await _console_tail(request, vm.metadata.uid)
    now, template = request.app[DATABASE].clock(), request.app[SETTINGS].trace_url_template
    charts = await ui_charts.vm_charts_html(request, vm)
    return _page(
        ui_pages.vm_page(vm, events, console=console, now=now, trace_template=template, charts=charts),
        VM_PAGE_HEADERS,
    )


async def _console_tail(request: web.Request, uid: str) -> str | None:
    """The end of the VM's serial log as text, or None when it has none (never started)."""
    path = serial_log_path(request.app[SETTINGS].data_dir, uid)
    try:
        chunk = await asyncio.to_thread(
            read_chunk, path, start=None, tail=CONSOLE_TAIL_BYTES, limit=CONSOLE_TAIL_BYTES, inode=None
        )
    except NoConsoleLog:
        return None
    return chunk.data.decode("utf-8", errors="replace")


async def project_list(request: web.Request) -> web.StreamResponse:
    projects = await request.app[STATES].list_projects()
    return _page(ui_pages.projects_page(projects, now=request.app[DATABASE].clock()))


async def project_detail(request: web.Request) -> web.StreamResponse:
    project = project_of(request)
    info = await request.app[STATES].project(project)
    versions = await request.app[STATES].list_versions(project)
    vms = [record.to_object() for record in await request.app[VMS].list_records(project=project)]
    # vm_name "": the project's own events (force-unlocks), not its VMs'.
    events = await event_log_of(request.app).list(project=project, vm_name="", limit=EVENTS_SHOWN)
    now = request.app[DATABASE].clock()
    template = request.app[SETTINGS].trace_url_template
    return _page(ui_pages.project_page(info, versions, vms, events, now=now, trace_template=template))


async def static_file(request: web.Request) -> web.StreamResponse:
    found = STATIC_FILES.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound(text="no such static file")
    body, content_type = found
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=headers)


# `{name}` (not a new placeholder) for static files: tests/component/test_http_auth.py fills
# every placeholder of ROUTES with a sample value it knows.
UI_ROUTES = [
    web.get("/ui", vm_list),
    web.get("/ui/projects", project_list),
    web.get("/ui/projects/{project}", project_detail),
    web.get("/ui/projects/{project}/vms/{name}", vm_detail),
    web.get("/ui/projects/{project}/vms/{name}/charts", vm_charts_fragment),
    web.get(ui_charts.OVERVIEW_URL, overview_fragment),
    web.get("/ui/static/{name}", static_file),
]
