"""The dashboard in a real browser: Terraform applies two VMs on real QEMU, headless Chromium
(Debian's, driven by Playwright) shows them Running, a click restarts one, and the page shows its
RESTARTS count go up without a reload; the VM page shows its console and events, each event's
trace id a link made from the server's trace_url_template, and the project page force-unlocks a
lock after a confirm() naming its ID.

Every wait is on the DOM or the API with a deadline, never a sleep. Screenshots are kept under
$TOFU_QEMU_TEST_ARTIFACTS/dashboard, or .cache/test-artifacts/dashboard in the repository
(git ignores .cache/), and their paths are printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Dialog, Locator, Page, Route, expect, sync_playwright

from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    PASSWORD,
    REPO_ROOT,
    USER,
    VM_WAIT_TIMEOUT,
    Fleet,
    GuestVM,
    ServerProcess,
    VmHost,
    is_running_current,
    run_setup_step,
)

pytestmark = pytest.mark.e2e

PROJECT = "dashboard"
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps calling home, which on a closed
# network means a flood of failing connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A restart is a graceful stop of a booted guest (about 1 s) and a new boot on TCG.
RESTART_TIMEOUT_MS = 90_000
VM_WAIT_MS = int(VM_WAIT_TIMEOUT * 1000)
# The script retries after 1, 2, 4, ... s; the server is down for about a second.
RECONNECT_TIMEOUT_MS = 30_000
K8S_API = "/apis/tofu-qemu.dev/v1alpha1"
WATCH_URL = re.compile(r"/qemuvms\?(.*&)?watch=true")
LIST_URL = re.compile(r"/qemuvms(\?(?!.*watch=true).*)?$")
EXPIRED = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired",
           "message": "injected by the test"}  # fmt: skip
LOCK_ID = "dashboard-lock-1"
# Never opened: the test reads the link, it does not follow it.
TRACE_URL_TEMPLATE = "http://127.0.0.1:16686/trace/{trace_id}"
TRACE_LINK = re.compile(r"^http://127\.0\.0\.1:16686/trace/[0-9a-f]{32}$")


def artifacts_dir() -> Path:
    base = os.environ.get("TOFU_QEMU_TEST_ARTIFACTS")
    root = Path(base) if base else REPO_ROOT / ".cache" / "test-artifacts"
    path = root / "dashboard"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Debian's Chromium (installed by hack/install-browser if missing), launched headless."""
    if not Path(CHROMIUM).exists() and shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and apt-get is unavailable to install it (hack/install-browser)")
    run_setup_step("install-browser")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class PageProblems:
    """Uncaught script errors and console errors of a page: the dashboard must have none.
    While the server is down on purpose, failed connections are expected and not counted."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.server_down = False
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        if self.server_down and ("net::ERR_" in message.text or "status of 410" in message.text):
            return
        self.errors.append(f"console: {message.text} at {message.location}")


class Screenshots:
    def __init__(self, page: Page) -> None:
        self.page = page
        self.saved: list[Path] = []

    def take(self, name: str) -> None:
        path = artifacts_dir() / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.saved.append(path)


def cell(page: Page, name: str, column: str) -> Locator:
    return page.locator(f'#vms tr[data-name="{name}"] td[data-col="{column}"]')


def test_dashboard_shows_vms_live_restarts_one_and_force_unlocks(
    make_vm_host: MakeVmHost, terraform_bin: str, chromium: Browser, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both VMs show Running; a click on Restart makes RESTARTS go up in place, no reload; the
    watch survives a server restart; the VM page and a force-unlock work."""
    host = make_vm_host()
    server = host.start("serve", extra_args=("--trace-url-template", TRACE_URL_TEMPLATE))
    fleet = Fleet(host, terraform_bin, project=PROJECT)
    fleet.init()
    fleet.apply({"a": GuestVM(memory=128), "b": GuestVM(memory=128)})
    context = chromium.new_context(
        base_url=server.url,
        http_credentials={"username": USER, "password": PASSWORD},
        viewport={"width": 1280, "height": 800},
    )
    try:
        page = context.new_page()
        problems = PageProblems(page)
        shots = Screenshots(page)
        restart_from_the_list(page, fleet, shots)
        follow_across_a_server_restart(page, host, problems)
        show_the_vm_page(page, host.server("serve"), shots)
        force_unlock(page, server, shots)
        assert problems.errors == []
    finally:
        context.close()
    with capsys.disabled():
        versions = f"Chromium {chromium.version}, Playwright {version('playwright')}"
        print(f"\ndashboard screenshots ({versions}):", *shots.saved, sep="\n  ", file=sys.stderr)


def restart_from_the_list(page: Page, fleet: Fleet, shots: Screenshots) -> None:
    """/ui shows both VMs Running; Restart on a's row makes its RESTARTS go up, without a reload."""
    page.goto("/ui")
    for name in ("a", "b"):
        expect(cell(page, name, "phase")).to_have_text("Running", timeout=VM_WAIT_MS)
    expect(page.locator("#live")).to_have_text(re.compile("^Live"))
    # Booted guests watch the power button, so the restart's graceful stop is quick.
    fleet.guest_info("a")
    before = fleet.wait_vm("a", is_running_current, what="Running")
    restarts = before["status"]["restarts"]
    expect(cell(page, "a", "restarts")).to_have_text(str(restarts))
    shots.take("vm-list-before")

    page.evaluate("window.notReloaded = true")
    page.locator('#vms tr[data-name="a"] button[data-action="restart"]').click()
    expect(page.locator("#action-result")).to_contain_text("restart a: requested")
    expect(cell(page, "a", "restarts")).to_have_text(str(restarts + 1), timeout=RESTART_TIMEOUT_MS)
    expect(cell(page, "a", "phase")).to_have_text("Running", timeout=RESTART_TIMEOUT_MS)
    assert page.evaluate("window.notReloaded") is True, "the page was reloaded"
    after = fleet.wait_vm("a", is_running_current, what="Running again")
    assert after["status"]["restarts"] == restarts + 1
    assert after["status"]["pid"] != before["status"]["pid"]
    expect(cell(page, "b", "restarts")).to_have_text(str(fleet.vm("b")["status"]["restarts"]))
    shots.take("vm-list-after-restart")


def follow_across_a_server_restart(page: Page, host: VmHost, problems: PageProblems) -> None:
    """The page notices the server is gone and comes back to Live when it returns; told that
    its resourceVersion expired (410, injected into the first new watch), it lists again; and a
    change made after all that (b stopped through the API) still appears without a reload."""
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    expired: list[str] = []

    def expire(route: Route) -> None:
        expired.append(route.request.url)
        route.fulfill(status=410, content_type="application/json", body=json.dumps(EXPIRED))

    page.route(WATCH_URL, expire, times=1)
    problems.server_down = True
    host.stop("serve")
    expect(page.locator("#live")).to_contain_text("Disconnected", timeout=RECONNECT_TIMEOUT_MS)
    server = host.start("serve")
    expect(page.locator("#live")).to_have_text(re.compile("^Live"), timeout=RECONNECT_TIMEOUT_MS)
    problems.server_down = False
    assert len(expired) == 1, "the first watch after the stream ended got the 410"
    after_expiry = requests[requests.index(expired[0]) + 1 :]
    assert any(LIST_URL.search(url) for url in after_expiry), f"no list after the 410: {after_expiry}"

    answer = server.request("POST", f"{K8S_API}/projects/{PROJECT}/qemuvms/b/stop", body=b"{}")
    assert answer.status == 200, answer.body
    expect(cell(page, "b", "phase")).to_have_text("Stopped", timeout=RESTART_TIMEOUT_MS)
    assert page.evaluate("window.notReloaded") is True, "the page was reloaded"


def show_the_vm_page(page: Page, server: ServerProcess, shots: Screenshots) -> None:
    """The VM page shows status, conditions, the restart's events and the guest's console; the
    restart's trace id links to the template's URL, the one the events API gives."""
    page.goto(f"/ui/projects/{PROJECT}/vms/a")
    expect(page.locator('[data-field="phase"]')).to_have_text("Running")
    expect(page.locator('[data-field="restarts"]')).to_have_text("1")
    expect(page.locator("#conditions")).to_contain_text("Ready")
    expect(page.locator("#events")).to_contain_text("RestartRequested")
    expect(page.locator("#console")).to_contain_text("TOFU-GUEST-READY name=a", timeout=VM_WAIT_MS)
    shots.take("vm-page")
    show_a_trace_link(page, server, shots)


def show_a_trace_link(page: Page, server: ServerProcess, shots: Screenshots) -> None:
    events = server.get_json(f"{K8S_API}/projects/{PROJECT}/qemuvms/a/events")["items"]
    restart = next(e for e in events if e["reason"] == "RestartRequested")
    assert TRACE_LINK.match(restart["traceUrl"]), restart
    assert restart["traceUrl"] == TRACE_URL_TEMPLATE.replace("{trace_id}", restart["traceId"])
    row = page.locator("#events tbody tr", has_text="RestartRequested").first
    link = row.locator("a.trace")
    expect(link).to_have_attribute("href", restart["traceUrl"])
    expect(link).to_have_text(restart["traceId"])
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    expect(link).to_have_attribute("target", "_blank")
    expect(page.locator("#events button.copy")).to_have_count(0)
    link.hover()
    shots.take("vm-page-trace-link")


def force_unlock(page: Page, server: ServerProcess, shots: Screenshots) -> None:
    """Force unlock asks with a confirm() naming the lock ID, then releases exactly that lock."""
    assert server.lock(PROJECT, LOCK_ID).status == 200
    page.goto(f"/ui/projects/{PROJECT}")
    expect(page.locator("#versions tbody tr").first).to_contain_text("OperationTypeApply")
    shots.take("project-page-locked")
    dialogs: list[str] = []

    def accept(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    page.locator('button[data-action="force-unlock"]').click()
    expect(page.locator("#action-result")).to_contain_text(f"lock {LOCK_ID} released")
    assert LOCK_ID in dialogs[0], dialogs
    assert server.project(PROJECT)["lock"] is None
    page.goto("/ui/projects")
    expect(page.locator(f'#projects tr[data-project="{PROJECT}"] td[data-col="lock"]')).to_have_text("—")
    shots.take("projects")
