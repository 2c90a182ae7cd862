"""The dashboard's pictures in a real browser: Terraform applies VMs on real QEMU (the tiny guest
on TCG) to a real `tofu-qemu serve` that samples usage every second, and headless Chromium
(Debian's, through Playwright) checks that

1. the fleet overview on /ui counts the VMs by phase, and its memory bar for the host moves when
   a third VM starts, without a reload;
2. after `tofu-qemu restart`, the VM page shows a CPU chart with samples at minute resolution
   (the last day's at 15 minutes) and the restart on its timeline; an event's trace id links
   to the URL of the server's trace_url_template;
3. the overview also renders in the dark colour scheme.

Every wait is on the DOM or the API with a deadline. Screenshots (the whole pages and the
sections alone, which hack/dashboard-screenshots copies to docs/images/) are kept under
$TOFU_QEMU_TEST_ARTIFACTS/dashboard, or .cache/test-artifacts/dashboard, like test_dashboard.py's.
"""

from __future__ import annotations

import re
import sys

import pytest
from playwright.sync_api import Browser, Page, expect

from api.charts import CHART_WIDTH
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import PASSWORD, USER, VM_WAIT_TIMEOUT, Fleet, GuestVM, is_running_current
from tests.e2e.test_cli import Cli
from tests.e2e.test_dashboard import (  # noqa: F401 - chromium is a fixture
    RESTART_TIMEOUT_MS,
    TRACE_URL_TEMPLATE,
    PageProblems,
    Screenshots,
    artifacts_dir,
    chromium,
)

pytestmark = pytest.mark.e2e

PROJECT = "charts"
VM_WAIT_MS = int(VM_WAIT_TIMEOUT * 1000)
# The page refreshes its pictures every 10 s and on every watch event; usage is sampled each
# second. The deadline allows for a host busy enough to starve the sampler (as VM_WAIT does).
PICTURE_WAIT_MS = VM_WAIT_MS
MEMORY_MIB = 128
SERVER_ARGS = ("--usage-sample-seconds", "1", "--trace-url-template", TRACE_URL_TEMPLATE)


MEMORY_METER = '#hosts tbody tr[data-host] td[data-col="memory"] svg.meter'


class Pictures(Screenshots):
    def section(self, selector: str, name: str) -> None:
        """A screenshot of one part of the page (small enough for the docs)."""
        path = artifacts_dir() / f"{name}.png"
        self.page.locator(selector).screenshot(path=str(path))
        self.saved.append(path)


def test_overview_charts_and_timeline(
    make_vm_host: MakeVmHost,
    terraform_bin: str,
    chromium: Browser,  # noqa: F811 - the fixture imported above
    capsys: pytest.CaptureFixture[str],
) -> None:
    host = make_vm_host()
    server = host.start("serve", extra_args=SERVER_ARGS)
    fleet = Fleet(host, terraform_bin, project=PROJECT)
    fleet.init()
    fleet.apply({"a": GuestVM(memory=MEMORY_MIB), "b": GuestVM(memory=MEMORY_MIB)})
    context = chromium.new_context(
        base_url=server.url,
        http_credentials={"username": USER, "password": PASSWORD},
        viewport={"width": 1200, "height": 800},
    )
    try:
        page = context.new_page()
        problems = PageProblems(page)
        shots = Pictures(page)
        overview_follows_a_third_vm(page, fleet, shots)
        vm_page_shows_cpu_and_a_restart(page, fleet, Cli(server), shots)
        page.emulate_media(color_scheme="dark")
        page.goto("/ui")
        expect(page.locator("#phase-counts li[data-phase='Running']")).to_have_attribute("data-count", "3")
        shots.section("#overview", "overview-dark")
        assert problems.errors == []
    finally:
        context.close()
    with capsys.disabled():
        print("\ndashboard chart screenshots:", *shots.saved, sep="\n  ", file=sys.stderr)


def overview_follows_a_third_vm(page: Page, fleet: Fleet, shots: Pictures) -> None:
    """Two VMs Running, then a third applied: the counts say 3 Running and the host's memory bar
    (what its VMs ask) grows by the third VM's memory, all without a reload."""
    page.goto("/ui")
    running = page.locator("#phase-counts li[data-phase='Running']")
    expect(running).to_have_attribute("data-count", "2", timeout=VM_WAIT_MS)
    meter = page.locator(MEMORY_METER)
    expect(meter).to_have_count(1)
    before = float(meter.get_attribute("data-used") or "nan")
    assert before == 2 * MEMORY_MIB
    width_before = float(meter.locator("rect.meter-fill").get_attribute("width") or "nan")
    shots.take("overview-two-vms")

    page.evaluate("window.notReloaded = true")
    fleet.apply({name: GuestVM(memory=MEMORY_MIB) for name in ("a", "b", "c")})
    expect(running).to_have_attribute("data-count", "3", timeout=VM_WAIT_MS)
    expect(page.locator(MEMORY_METER)).to_have_attribute("data-used", str(3 * MEMORY_MIB))
    width_after = float(page.locator(f"{MEMORY_METER} rect.meter-fill").get_attribute("width") or "nan")
    assert width_after > width_before, (width_before, width_after)
    expect(page.locator("#overview h3").first).to_contain_text("(3 in all)")
    expect(page.locator("#vms tbody tr[data-uid]")).to_have_count(3)
    # Sampled every second: the busiest VMs appear once the page refreshes its pictures.
    expect(page.locator("#top-cpu li")).to_have_count(3, timeout=PICTURE_WAIT_MS)
    expect(page.locator("#top-memory li")).to_have_count(3)
    assert page.evaluate("window.notReloaded") is True, "the page was reloaded"
    shots.take("overview")
    shots.section("#overview", "overview-section")


def charts_at_minute_resolution(page: Page) -> None:
    """The last hour is drawn a bar a minute and the last day a bar per 15 minutes: each window
    says its bar's length, and no bar is wider than that length of its chart (a 60th of the
    hour's, a 96th of the day's), where an hour's bar would be up to the whole chart. The test
    is shorter than the two minutes that would show two bars; tests/component/test_ui_charts.py
    checks several minute bars from stored minutes."""
    for window, step, bars in (("hour", 60, 60), ("day", 900, 96)):
        panel = page.locator(f"#charts .panel[data-window='{window}']")
        expect(panel).to_have_attribute("data-step-seconds", str(step))
        widths = [
            float(width or "nan")
            for width in panel.locator(f"#cpu-{window} svg.chart rect.bar").evaluate_all(
                "rects => rects.map(r => r.getAttribute('width'))"
            )
        ]
        assert widths, window
        assert all(0 < width <= CHART_WIDTH / bars + 0.01 for width in widths), (window, widths)


def vm_page_shows_cpu_and_a_restart(page: Page, fleet: Fleet, cli: Cli, shots: Pictures) -> None:
    """`tofu-qemu restart` a VM: its page shows CPU samples, the restart on the timeline of the
    last hour, and the RestartRequested event's trace id as a link made from the template."""
    before = fleet.wait_vm("a", is_running_current, what="Running")
    assert cli.run("restart", "vm", "a", "-p", PROJECT).strip() == (
        f"qemuvm/a restart requested (project {PROJECT})"
    )
    fleet.wait_vm(
        "a",
        lambda vm: is_running_current(vm) and vm["status"]["restarts"] == before["status"]["restarts"] + 1,
        what="Running after the restart",
    )
    page.goto(f"/ui/projects/{PROJECT}/vms/a")
    timeline = page.locator("#timeline-hour svg.timeline")
    expect(timeline).to_have_attribute("data-restarts", "1", timeout=PICTURE_WAIT_MS)
    expect(timeline.locator(".segment[data-phase='Running']").first).to_be_visible()
    expect(page.locator("#timeline-hour figcaption")).to_contain_text("1 restart, the last at")
    cpu = page.locator("#cpu-hour svg.chart")
    expect(cpu).not_to_have_attribute("data-samples", "0", timeout=PICTURE_WAIT_MS)
    expect(cpu.locator("rect.bar").first).to_be_visible()
    expect(page.locator("#cpu-hour figcaption")).to_contain_text(
        re.compile(r"latest \d+\.\d\d cores \(mean of the minute from \d\d:\d\d UTC\)")
    )
    charts_at_minute_resolution(page)
    expect(page.locator("#memory-day figcaption")).to_contain_text(re.compile(r"latest \d+ MiB"))
    link = page.locator("#events tbody tr", has_text="RestartRequested").first.locator("a.trace")
    expect(link).to_have_attribute("href", re.compile("^" + re.escape(TRACE_URL_TEMPLATE.split("{")[0])))
    trace_id = link.inner_text()
    assert link.get_attribute("href") == TRACE_URL_TEMPLATE.replace("{trace_id}", trace_id)
    shots.take("vm-charts")
    shots.section("#charts", "vm-charts-section")
