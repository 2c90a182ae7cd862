"""The dashboard's pages (/ui) over HTTP: what they show, that every value is escaped, the
security headers, the Basic challenge, and the static files.

The store holds project `lab` with two VMs (one Running with ports and restarts, one with a
console log and events full of markup) and project `locked`, whose lock info is hostile JSON:
names are validated, but lock info, console output and event messages are free text.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.infra.credentials import load_credentials
from api.server import create_app
from api.server.console import serial_log_path
from api.server.keys import DATABASE, VMS
from api.server.routes import ROUTES
from api.server.ui import UI_ROUTES
from api.settings import ServerSettings
from api.store.events import EventLog, EventType, NewEvent
from api.store.status_writer import VMStatusWriter
from api.testing.tfstate import encode, vm_state
from tests.component.conftest import AUTH, ClientFactory, FakeClock

Client = TestClient[Any, Any]
SCRIPT = "<script>alert(1)</script>"
HOSTILE_LOCK = {
    "ID": 'lock-"><img src=x onerror=alert(2)>',
    "Operation": "OperationTypeApply",
    "Info": "</pre><script>alert(3)</script>",
    "Who": SCRIPT,
    "Version": "1.11.4",
    "Created": "2026-11-21T11:50:00Z",
    "Path": "",
}
UI_PAGES = ["/ui", "/ui/projects", "/ui/projects/lab", "/ui/projects/lab/vms/web"]


class Tables(HTMLParser):
    """Every <table id=...> as rows of cell texts, and every <script> tag's attributes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.scripts: list[dict[str, str | None]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "table":
            self._table = found.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "script":
            self.scripts.append(found)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table is not None and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture
async def ui(aiohttp_client: ClientFactory, clock: FakeClock, settings: ServerSettings) -> Client:
    """The real app, with the UI routes whether or not ROUTES has them yet, and a store as above."""
    credentials = load_credentials(users="alice:s3cret", tokens="tok-1", users_file=None)
    app: web.Application = create_app(settings, credentials=credentials, clock=clock)
    if not any(getattr(route, "path", None) == "/ui" for route in ROUTES):
        app.add_routes(UI_ROUTES)
    client = await aiohttp_client(app)
    await _populate(client, clock, settings.data_dir)
    return client


async def _populate(client: Client, clock: FakeClock, data_dir: Path) -> None:
    vms = {"web": {"labels": {"tier": "web"}, "network": {"forwards": [{"guestPort": 80}]}}, "db": {}}
    assert (await client.post("/state/lab", data=encode(vm_state(1, vms)), headers=AUTH)).status == 200
    db = client.app[DATABASE]
    web_vm = await client.app[VMS].get("lab", "web")
    status = {
        "phase": "Running",
        "pid": 4242,
        "accel": "tcg",
        "restarts": 3,
        "observedGeneration": 1,
        "ports": [{"protocol": "tcp", "guestPort": 80, "hostPort": 20001}],
        "conditions": [
            {"type": "Valid", "status": "True", "reason": "SpecAccepted", "message": "",
             "lastTransitionTime": clock.now.isoformat()},
            {"type": "Ready", "status": "True", "reason": "Running", "message": "booted <fast>",
             "lastTransitionTime": clock.now.isoformat()},
        ],
    }  # fmt: skip
    assert await VMStatusWriter(db).write_status(web_vm.uid, status)
    await EventLog(db).record(
        NewEvent(web_vm.uid, "lab", "web", "Started", f"QEMU said {SCRIPT}", type=EventType.WARNING)
    )
    console = serial_log_path(data_dir, web_vm.uid)
    console.parent.mkdir(parents=True)
    console.write_bytes(b"boot ok\r\n\x1b[31m<script>alert(4)</script>\x1b[0m & done\x07\n")
    locked = encode(vm_state(1, {}))
    assert (await client.post("/state/locked", data=locked, headers=AUTH)).status == 200
    lock = await client.request("LOCK", "/state/locked/lock", data=json.dumps(HOSTILE_LOCK), headers=AUTH)
    assert lock.status == 200
    clock.advance(150)


async def page(client: Client, path: str) -> str:
    response = await client.get(path, headers=AUTH)
    assert response.status == 200, await response.text()
    assert response.content_type == "text/html"
    return await response.text()


def assert_no_raw_markup(text: str) -> None:
    """None of the hostile values reached the page unescaped, and no script is inline."""
    for raw in (SCRIPT, "<script>alert(3)", "<script>alert(4)", "<img src=x", "booted <fast>"):
        assert raw not in text
    assert all(attrs.get("src") for attrs in Tables(text).scripts), "every script is a file"
    assert " onerror=" not in text.replace("onerror=alert", "")
    assert "style=" not in text


async def test_vm_list_shows_kubectl_columns_for_every_vm(ui: Client) -> None:
    """/ui lists every VM with NAME, PROJECT, PHASE, READY, ACCEL, PORTS, RESTARTS, AGE."""
    rows = Tables(await page(ui, "/ui")).tables["vms"]
    assert rows[0] == ["NAME", "PROJECT", "PHASE", "READY", "ACCEL", "PORTS", "RESTARTS", "AGE", "ACTIONS"]
    assert rows[1:] == [
        ["db", "lab", "Pending", "—", "—", "—", "0", "2m30s", "Restart"],
        ["web", "lab", "Running", "True", "tcg", "20001→80/tcp", "3", "2m30s", "Restart"],
    ]


async def test_vm_list_rows_carry_what_the_script_needs(ui: Client) -> None:
    """Each row names its uid, project and name, links to the VM page, and the page loads app.js."""
    text = await page(ui, "/ui")
    web_uid = (await ui.app[VMS].get("lab", "web")).uid
    assert f'data-uid="{web_uid}" data-project="lab" data-name="web"' in text
    assert 'href="/ui/projects/lab/vms/web"' in text
    assert 'data-api="/apis/tofu-qemu.dev/v1alpha1"' in text
    assert '<script type="module" src="/ui/static/app.js"></script>' in text


async def test_vm_page_shows_status_conditions_events_console_and_spec(ui: Client) -> None:
    """The VM page has the status, a conditions table, an events table, the console tail, the spec."""
    text = await page(ui, "/ui/projects/lab/vms/web")
    tables = Tables(text).tables
    assert tables["conditions"][2][:4] == ["Ready", "True", "Running", "booted <fast>"]
    assert tables["events"][-1][1:4] == ["Warning", "Started", f"QEMU said {SCRIPT}"]
    assert '<span data-field="restarts">3</span>' in text
    assert '<span data-field="ports">20001→80/tcp</span>' in text
    assert "boot ok\n&lt;script&gt;alert(4)&lt;/script&gt; &amp; done\n</pre>" in text, "ANSI and BEL removed"
    assert "&quot;guestPort&quot;: 80" in text
    for action in ("restart", "stop", "start", "pause", "unpause"):
        assert f'data-action="{action}" data-project="lab" data-name="web"' in text
    assert_no_raw_markup(text)


async def test_vm_page_without_console_log_says_so(ui: Client) -> None:
    """A VM that never started has no console: the page says so instead of failing."""
    assert "the VM has not started" in await page(ui, "/ui/projects/lab/vms/db")


async def test_projects_page_shows_the_lock_escaped_with_a_force_unlock_button(ui: Client) -> None:
    """/ui/projects lists projects; the hostile lock info is shown as text, also in attributes."""
    text = await page(ui, "/ui/projects")
    rows = Tables(text).tables["projects"]
    assert [row[0] for row in rows] == ["NAME", "lab", "locked"]
    assert rows[2][4].startswith(
        f'{SCRIPT} (OperationTypeApply), lock-"><img src=x onerror=alert(2)>, locked'
    )
    assert 'data-lock-id="lock-&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"' in text
    assert 'data-action="force-unlock" data-project="locked"' in text
    assert_no_raw_markup(text)


async def test_project_page_shows_versions_lock_fields_and_vms(ui: Client) -> None:
    """A project page has its lock info field by field, its state versions and its VMs."""
    text = await page(ui, "/ui/projects/locked")
    assert "<dt>Info</dt><dd>&lt;/pre&gt;&lt;script&gt;alert(3)&lt;/script&gt;</dd>" in text
    assert "Force unlock" in text
    assert_no_raw_markup(text)
    lab = Tables(await page(ui, "/ui/projects/lab")).tables
    assert lab["versions"][0][:4] == ["SERIAL", "WHO", "OPERATION", "TIME"]
    assert lab["versions"][1][0] == "1"
    assert [row[0] for row in lab["vms"][1:]] == ["db", "web"]


@pytest.mark.parametrize("path", ["/ui/projects/lab/vms/nope", "/ui/projects/nope"])
async def test_unknown_vm_or_project_is_the_apis_404(ui: Client, path: str) -> None:
    """A missing VM or project is the API's 404 Status (JSON, as every error of the server)."""
    response = await ui.get(path, headers=AUTH)
    assert (response.status, response.content_type) == (404, "application/json")
    body = await response.json()
    assert (body["kind"], body["code"]) == ("Status", 404)
    assert "'nope'" in body["message"]


@pytest.mark.parametrize("path", [*UI_PAGES, "/ui/static/app.js", "/ui/static/style.css"])
async def test_ui_answers_carry_the_security_headers(ui: Client, path: str) -> None:
    """CSP allows this origin only (no inline script, no framing); nosniff; no referrer."""
    response = await ui.get(path, headers=AUTH)
    assert response.status == 200
    csp = response.headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'self'")
    assert "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


@pytest.mark.parametrize("path", [*UI_PAGES, "/ui/static/app.js"])
async def test_ui_without_credentials_is_401_with_a_basic_challenge(ui: Client, path: str) -> None:
    """A browser without credentials gets the Basic challenge, so it prompts for them."""
    response = await ui.get(path)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="tofu-qemu"')


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("app.js", "text/javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")],
)
async def test_static_files_are_served_with_their_content_type(
    ui: Client, name: str, content_type: str
) -> None:
    """The script and the stylesheet are served from the package, UTF-8, with their types."""
    response = await ui.get(f"/ui/static/{name}", headers=AUTH)
    assert (response.status, response.content_type, response.charset) == (200, content_type, "utf-8")
    expected = (Path(__file__).parents[2] / "api" / "server" / "ui_static" / name).read_bytes()
    assert await response.read() == expected


@pytest.mark.parametrize("name", ["nope.js", "..%2Fui.py", "%2E%2E", "ui.py"])
async def test_only_the_static_files_are_reachable(ui: Client, name: str) -> None:
    """Anything but a file of ui_static (and no path outside it) is 404."""
    response = await ui.get(f"/ui/static/{name}", headers=AUTH)
    assert response.status == 404


STATIC_DIR = Path(__file__).parents[2] / "api" / "server" / "ui_static"


async def test_the_script_sends_writes_as_json_with_the_ui_header() -> None:
    """The actions are POSTs with a JSON body and X-Requested-By (unchecked: it forces a CORS
    preflight); no module of the script writes HTML."""
    script = "\n".join(path.read_text() for path in sorted(STATIC_DIR.glob("*.js")))
    assert '"Content-Type": "application/json"' in script
    assert '"X-Requested-By": "tofu-qemu-ui"' in script
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert unsafe not in script


async def test_every_module_the_script_imports_is_served(ui: Client) -> None:
    """app.js is an ES module: each relative import of each module is a file the static route
    serves as JavaScript, so the browser finds every part."""
    imported = {"app.js"}
    for path in STATIC_DIR.glob("*.js"):
        imported |= set(re.findall(r'^import (?:.+ from )?"\./([\w.]+)";', path.read_text(), re.MULTILINE))
    assert imported >= {"dom.js", "http.js", "vm_table.js", "vm_page.js", "actions.js"}
    for name in sorted(imported):
        response = await ui.get(f"/ui/static/{name}", headers=AUTH)
        assert (response.status, response.content_type) == (200, "text/javascript"), name
