"""The dashboard's pictures, pure: chart geometry (api/charts.py), the VM timeline from events
(api/timeline.py), the VM page's usage series (api/vm_charts.py) and the fleet overview's
figures (api/overview.py). Table tests; the SVG text is checked for what a reader relies on:
a title with the latest values, a pattern per part, and escaping."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from api.charts import (
    PATTERNS,
    Interval,
    Rect,
    meter,
    meter_width,
    nice_top,
    patterns_defs,
    stacked,
    step_chart,
    step_rects,
)
from api.overview import (
    RUNS,
    TOP_VMS,
    HostDisk,
    VMNow,
    disk_by_host,
    overview_section,
    phase_counts,
    top_by,
    vms_now,
)
from api.timeline import LogEntry, Restart, Segment, summary, timeline, timeline_svg
from api.types import ObjectMeta, Phase, QemuVM, QemuVMStatus
from api.usage import HourUsage, SpanUsage, Usage
from api.vm_charts import WINDOWS, charts_section, latest_text, series

T0 = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
SEC = timedelta(seconds=1)
HOUR = timedelta(hours=1)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.mark.parametrize(
    ("largest", "top"),
    [(0, 1.0), (-3, 1.0), (float("nan"), 1.0), (0.3, 0.5), (1, 1.0), (1.01, 2.0), (2.5, 5.0), (7, 10.0),
     (120, 200.0), (0.02, 0.02), (384, 500.0)],
)  # fmt: skip
def test_the_axis_top_is_the_next_one_two_or_five(largest: float, top: float) -> None:
    assert nice_top(largest) == pytest.approx(top)


@pytest.mark.parametrize(
    ("used", "capacity", "width"),
    [(0, 16, 0.0), (4, 16, 75.0), (16, 16, 300.0), (20, 16, 300.0), (5, 0, 0.0), (-1, 4, 0.0)],
)
def test_a_capacity_bar_fills_in_proportion_and_never_past_its_end(
    used: float, capacity: float, width: float
) -> None:
    assert meter_width(used, capacity) == pytest.approx(width)


def test_step_rects_clip_each_interval_to_the_window_and_scale_to_the_top() -> None:
    intervals = [
        Interval(at(-120), at(-60), 9.0),  # entirely before: left out
        Interval(at(-30), at(30), 1.0),  # half in the window
        Interval(at(30), at(60), 4.0),  # taller than the top: clipped to it
    ]
    rects = step_rects(intervals, at(0), at(60), top=2.0, width=600, height=100)
    assert rects == [Rect(0, 50, 300, 50), Rect(300, 0, 300, 100)]
    assert step_rects(intervals, at(0), at(0), top=1.0) == []


def test_a_step_chart_says_its_latest_value_and_counts_its_bars() -> None:
    svg = step_chart(
        "CPU", [Interval(at(0), at(30), 0.25)], at(0), at(60), unit="cores", text="latest 0.25 cores"
    )
    assert 'data-samples="1"' in svg
    assert "<title>CPU: latest 0.25 cores</title>" in svg
    assert "0.5 cores" in svg  # the axis top
    assert "14:00 UTC" in svg
    assert "15:00 UTC" in svg
    day = step_chart("CPU", [], at(0) - 23 * HOUR, at(60), unit="cores", text="none")
    assert "Wed 15:00 UTC" in day
    assert "Thu 15:00 UTC" in day
    assert 'data-samples="0"' in day


def test_every_part_has_its_own_texture_and_the_text_is_escaped() -> None:
    defs = patterns_defs()
    textured = [name for name, body in PATTERNS.items() if body]
    assert all(f'id="pattern-{name}"' in defs for name in textured)
    assert len(set(PATTERNS.values())) == len(PATTERNS), "two patterns look alike"
    bar = meter("<b>", 3, 2, text="<script>")
    assert "<script>" not in bar
    assert "&lt;script&gt;" in bar
    assert 'class="meter over"' in bar
    parts = stacked(
        "VMs", [("Running", 3, "solid"), ("Stopped", 1, "dots"), ("Failed", 0, "cross")], text="t"
    )
    assert re.findall(r'data-part="(\w+)" data-count="(\d)"', parts) == [("Running", "3"), ("Stopped", "1")]
    assert "url(#pattern-dots)" in parts
    assert "Running 3" in parts


# ---- The timeline ---------------------------------------------------------------------------


def entry(minutes: float, reason: str, message: str = "") -> LogEntry:
    return LogEntry(at(minutes), reason, message)


def test_phases_last_from_their_event_to_the_next_and_the_last_to_the_end() -> None:
    entries = [
        entry(-10, "Started"),
        entry(5, "PortsAllocated"),  # no phase
        entry(10, "Started"),  # the same phase again: one segment
        entry(20, "ExitDetected"),
        entry(21, "BackOff"),
        entry(30, "Started"),
        entry(31, "Restarted", "restart 1 after crashed"),
        entry(40, "Stopping"),
        entry(41, "Stopped"),
    ]
    line = timeline(entries, at(0), at(60))
    assert line.segments == (
        Segment("Running", at(0), at(21)),  # began before the window: cut at its start
        Segment("CrashLoopBackOff", at(21), at(30)),
        Segment("Running", at(30), at(40)),
        Segment("Stopping", at(40), at(41)),
        Segment("Stopped", at(41), at(60)),
    )
    assert line.restarts == (Restart(at(31), "restart 1 after crashed"),)
    assert summary(line) == (
        "Stopped since 14:41 UTC (before: CrashLoopBackOff, Running, Stopping);"
        " 1 restart, the last at 14:31 UTC"
    )


def test_nothing_is_drawn_before_the_first_phase_event_nor_after_the_end() -> None:
    line = timeline([entry(-90, "Restarted"), entry(30, "Paused"), entry(70, "Stopped")], at(0), at(60))
    assert line.segments == (Segment("Paused", at(30), at(60)),)
    assert line.restarts == ()
    assert summary(line) == "Paused since 14:30 UTC; no restarts"
    assert summary(timeline([], at(0), at(60))) == "no phase change recorded in this window; no restarts"


def test_the_timeline_svg_marks_each_restart_and_labels_wide_segments() -> None:
    entries = [
        entry(0, "Started"),
        entry(20, "Restarted", "restart <1>"),
        entry(30, "Restarted", "restart 2"),
    ]
    svg = timeline_svg("Timeline", timeline(entries, at(0), at(60)), at(0), at(60))
    assert 'data-restarts="2"' in svg
    assert svg.count('class="restart"') == 2
    assert "restart &lt;1&gt; at 14:20 UTC" in svg
    assert 'data-phase="Running"' in svg
    assert ">Running</text>" in svg
    assert "2 restarts, the last at 14:30 UTC" in svg


def test_phases_of_no_duration_have_no_bar_but_the_last_still_names_the_phase() -> None:
    """Events at one instant (a fast stop, or a phase that began just now) draw no bar."""
    entries = [entry(10, "Started"), entry(30, "Stopping"), entry(30, "Stopped"), entry(60, "Started")]
    line = timeline(entries, at(0), at(60))
    assert [s.phase for s in line.segments] == ["Running", "Stopping", "Stopped", "Running"]
    svg = timeline_svg("Timeline", line, at(0), at(60))
    assert re.findall(r'data-phase="(\w+)"', svg) == ["Running", "Stopped"]
    assert summary(line).startswith("Running since 15:00 UTC")


# ---- A VM's usage series --------------------------------------------------------------------


def hour_row(uid: str, hour: datetime, cpu: float, mem: float, up: float, name: str = "web") -> HourUsage:
    return HourUsage(uid, "lab", name, hour, Usage(cpu, mem, up), disk_bytes=0)


def span(start: datetime, cpu: float, mem: float, up: float, length: timedelta = MIN) -> SpanUsage:
    return SpanUsage(start, length, Usage(cpu, mem, up))


def test_series_are_means_while_up_per_bar_the_current_one_ending_now() -> None:
    now = T0 + 2 * MIN + 30 * SEC
    bars = [
        span(T0 + 2 * MIN, cpu=15, mem=50 * 30, up=30),  # the current minute, out of order
        span(T0, cpu=30, mem=100 * 60, up=60),
        span(T0 + MIN, cpu=0, mem=0, up=0),  # not up that minute: no bar
    ]
    data = series(bars, now)
    assert data.cpu_cores == (Interval(T0, T0 + MIN, 0.5), Interval(T0 + 2 * MIN, now, 0.5))
    assert data.memory_mib == (Interval(T0, T0 + MIN, 100.0), Interval(T0 + 2 * MIN, now, 50.0))
    assert (
        latest_text(data.cpu_cores, "cores", 2, MIN)
        == "latest 0.50 cores (mean of the minute from 14:02 UTC)"
    )
    quarter = latest_text(data.cpu_cores, "cores", 2, 15 * MIN)
    assert quarter == "latest 0.50 cores (mean of the 15 minutes from 14:02 UTC)"
    assert latest_text((), "MiB", 0, MIN) == "no samples in this window"


def test_the_vm_charts_are_an_hour_of_minutes_and_a_day_of_quarter_hours() -> None:
    """60 + 96 bars: the most a VM page reads and draws."""
    assert [(w.key, w.span, w.step, w.bars) for w in WINDOWS] == [
        ("hour", HOUR, MIN, 60),
        ("day", timedelta(days=1), 15 * MIN, 96),
    ]
    now = T0 + 30 * MIN
    minutes = [span(T0 + n * MIN, 30, 60 * 64, 60) for n in range(30)]
    quarters = [span(T0 + n * 15 * MIN, 450, 900 * 64, 900, 15 * MIN) for n in range(2)]
    html = charts_section(
        {"hour": minutes, "day": quarters},
        [entry(1, "Started"), entry(2, "Restarted", "restart 1")],
        now,
        fragment_url="/ui/x/charts",
        refresh_ms=10_000,
    )
    for figure in ("cpu-hour", "memory-hour", "timeline-hour", "cpu-day", "memory-day", "timeline-day"):
        assert f'id="{figure}"' in html
    assert html.count('data-samples="30"') == 2
    assert html.count('data-samples="2"') == 2
    assert 'data-window="hour" data-step-seconds="60"' in html
    assert 'data-window="day" data-step-seconds="900"' in html
    # A minute is a 60th of the hour chart's width; a quarter hour a 96th of the day chart's.
    hour_bars = re.findall(
        r'<rect class="bar" x="[^"]*" y="[^"]*" width="([^"]*)"', html.split('id="cpu-day"')[0]
    )
    assert set(hour_bars) == {"10"}
    assert "latest 0.50 cores (mean of the minute from 14:29 UTC)" in html
    assert "latest 64 MiB (mean of the 15 minutes from 14:15 UTC)" in html
    assert 'data-fragment="/ui/x/charts" data-refresh-ms="10000"' in html
    assert (
        charts_section({}, [], now, fragment_url="/x", refresh_ms=1).count("no samples in this window")
        == 4 * 2  # title and caption
    )


# ---- The fleet overview ---------------------------------------------------------------------


def vm(name: str, phase: Phase, *, host: str | None = "h1", project: str = "lab") -> QemuVM:
    meta = ObjectMeta(
        project=project, name=name, uid=f"uid-{name}", generation=1, creation_timestamp=T0, state_serial=1
    )
    return QemuVM(metadata=meta, spec={}, status=QemuVMStatus(phase=phase, host=host))


def test_vms_are_counted_by_phase_every_phase_listed() -> None:
    counts = phase_counts(
        [vm("a", Phase.RUNNING), vm("b", Phase.RUNNING), vm("c", Phase.CRASH_LOOP_BACK_OFF)]
    )
    assert counts["Running"] == 2
    assert counts["CrashLoopBackOff"] == 1
    assert counts["Stopped"] == 0
    assert set(counts) == {phase.value for phase in Phase}


def test_now_is_the_last_rss_and_the_mean_cpu_of_the_recent_hours_for_running_vms_only() -> None:
    vms = [vm("a", Phase.RUNNING), vm("b", Phase.PAUSED), vm("c", Phase.STOPPED), vm("d", Phase.RUNNING)]
    rows = [
        hour_row("uid-a", T0, cpu=30, mem=0, up=60, name="a"),
        hour_row("uid-a", T0 + HOUR, cpu=30, mem=0, up=60, name="a"),
        hour_row("uid-b", T0, cpu=0, mem=200 * 60, up=60, name="b"),
        hour_row("uid-c", T0, cpu=60, mem=60, up=60, name="c"),
    ]
    now = vms_now(vms, rows, {"uid-a": 150 * 1024 * 1024, "uid-c": 1})
    assert now == [
        VMNow("lab", "a", 0.5, 150.0),
        VMNow("lab", "b", 0.0, 200.0),  # no sample kept: the mean of its hours
        VMNow("lab", "c", None, None),  # stopped: nothing is used now
        VMNow("lab", "d", None, None),  # not measured yet
    ]
    assert {Phase.RUNNING, Phase.PAUSED} == RUNS


def test_the_top_lists_are_the_largest_first_measured_only_at_most_five() -> None:
    now = [VMNow("p", f"v{i}", float(i % 3), None) for i in range(8)]
    assert TOP_VMS == 5
    top = top_by(now, "cpu_cores")
    assert [(vm.name, vm.cpu_cores) for vm in top] == [
        ("v2", 2.0),
        ("v5", 2.0),
        ("v1", 1.0),
        ("v4", 1.0),
        ("v7", 1.0),
    ]
    assert top_by(now, "memory_mib") == []


def test_disk_is_summed_per_host_of_placed_vms() -> None:
    vms = [vm("a", Phase.RUNNING), vm("b", Phase.STOPPED), vm("c", Phase.RUNNING, host=None)]
    assert disk_by_host(vms, {"uid-a": 10, "uid-b": 5, "uid-c": 99}) == {"h1": 15}


def test_the_overview_shows_counts_host_bars_and_top_lists() -> None:
    host = {
        "name": "h1", "ready": False, "cordoned": True,
        "capacity": {"cpus": 4, "memoryMiB": 1000, "ports": 10},
        "allocated": {"cpus": 2, "memoryMiB": 256, "ports": 1},
    }  # fmt: skip
    vms = [vm("a", Phase.RUNNING), vm("b", Phase.STOPPED)]
    html = overview_section(
        vms,
        [host],
        {"h1": HostDisk(used_bytes=50 * 1024 * 1024, capacity_bytes=None)},
        [VMNow("lab", "a", 0.25, 100.0)],
        fragment_url="/ui/fragments/overview",
        refresh_ms=10_000,
    )
    assert '<li data-phase="Running" data-count="1">' in html
    assert '<li data-phase="Stopped" data-count="1">' in html
    assert "(2 in all)" in html
    assert "NotReady,SchedulingDisabled" in html
    assert "2 of 4 vCPUs" in html
    assert "256 of 1000 MiB" in html
    assert "1 of 10 ports" in html
    assert "50 MiB (size not reported)" in html
    assert 'data-vm="lab/a"' in html
    assert "0.25 cores" in html
    assert "100 MiB" in html
    assert 'href="/ui/projects/lab/vms/a"' in html
