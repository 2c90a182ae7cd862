"""Usage metering's math (controller/metering.py) and report (api/usage.py): deltas between
samples of one process, QEMU and controller restarts, hour boundaries."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from api.usage import Cursor, HourUsage, Usage, build_report
from controller.metering import (
    MIB,
    Interval,
    ProcessSample,
    hour_of,
    period_of,
    split_by_hour,
    split_by_minute,
    usage_since,
)
from controller.settings import ControllerSettings

HZ = 100
T0 = datetime(2026, 12, 3, 13, 0, tzinfo=UTC).timestamp()
NO_LIMIT = float("inf")


def sample(
    at: float, cpu_ticks: int, *, pid: int = 42, start_ticks: int = 1000, rss_mib: int = 100
) -> ProcessSample:
    return ProcessSample(
        pid=pid, start_ticks=start_ticks, started_at=T0, cpu_ticks=cpu_ticks, rss_bytes=rss_mib * MIB, at=at
    )


def since(cursor: Cursor | None, current: ProcessSample, *, limit: float = NO_LIMIT) -> Interval:
    return usage_since(cursor, current, ticks_per_second=HZ, backfill_limit=limit)


def test_a_delta_between_two_samples_of_one_process() -> None:
    """CPU is the difference of the counters; memory the trapezoid; uptime the time between."""
    first = sample(T0 + 10, 500, rss_mib=100)
    interval = since(first.cursor(), sample(T0 + 25, 2000, rss_mib=300))
    assert (interval.start, interval.end) == (T0 + 10, T0 + 25)
    assert interval.usage == Usage(cpu_seconds=15.0, memory_mib_seconds=200 * 15, uptime_seconds=15)


def test_a_process_never_counted_is_counted_from_its_start() -> None:
    """No cursor (first sight): its counters began at zero when it started, and so did its memory."""
    interval = since(None, sample(T0 + 20, 1800, rss_mib=200))
    assert (interval.start, interval.end) == (T0, T0 + 20)
    assert interval.usage == Usage(cpu_seconds=18.0, memory_mib_seconds=100 * 20, uptime_seconds=20)


def test_a_qemu_restart_counts_the_new_process_from_zero_never_a_negative_delta() -> None:
    """The new process's counters are smaller than the old cursor's: they are its whole use,
    from its start (not from the old cursor, nor negative)."""
    old = sample(T0 + 100, 90_000, pid=42, start_ticks=1000).cursor()
    new = replace(sample(T0 + 130, 700, pid=43, start_ticks=11_000), started_at=T0 + 110)
    interval = since(old, new)
    assert (interval.start, interval.usage.cpu_seconds, interval.usage.uptime_seconds) == (T0 + 110, 7.0, 20)


def test_a_reused_pid_is_a_new_process() -> None:
    """Same pid, another start time: a different process, counted from its own start."""
    old = sample(T0 + 100, 90_000, start_ticks=1000).cursor()
    new = replace(sample(T0 + 130, 300, start_ticks=12_000), started_at=T0 + 120)
    assert since(old, new).usage.cpu_seconds == 3.0


def test_a_new_process_never_reaches_back_before_the_last_sample() -> None:
    """Its start time (from btime, whole seconds) may read earlier than the old cursor: the
    interval still starts at the cursor, so no time is counted twice."""
    old = sample(T0 + 100, 90_000, pid=42).cursor()
    new = replace(sample(T0 + 130, 700, pid=43), started_at=T0 + 99.5)
    assert since(old, new).start == T0 + 100


def test_backfill_is_bounded() -> None:
    """A process first seen long after its start is counted back at most `backfill_limit`."""
    late = sample(T0 + 10 * 86400, 5000)
    assert since(None, late, limit=3600).start == late.at - 3600


def test_counters_never_go_backwards_within_a_process() -> None:
    cursor = sample(T0 + 10, 500).cursor()
    assert since(cursor, sample(T0 + 20, 400)).usage.cpu_seconds == 0


def test_a_controller_restart_resumes_from_the_stored_cursor_exactly() -> None:
    """Counting a -> b -> c equals counting a -> c (what a controller that was down during b,
    resuming from a's stored cursor, does): nothing lost, nothing twice."""
    a, b, c = sample(T0 + 10, 100), sample(T0 + 40, 2100), sample(T0 + 70, 5100)
    stepwise = since(a.cursor(), b).usage + since(b.cursor(), c).usage
    resumed = since(a.cursor(), c).usage
    assert stepwise.cpu_seconds == resumed.cpu_seconds == 50.0
    assert stepwise.uptime_seconds == resumed.uptime_seconds == 60


def test_an_interval_within_an_hour_stays_whole() -> None:
    parts = split_by_hour(Interval(T0 + 60, T0 + 120, Usage(6, 60, 60)))
    assert parts == [(datetime(2026, 12, 3, 13, tzinfo=UTC), Usage(6, 60, 60))]


def test_an_interval_across_hour_boundaries_is_split_by_overlap_and_sums_to_the_whole() -> None:
    """15 min before 14:00, a whole hour, 30 min after 15:00: 1/7, 4/7, 2/7 of 105 minutes."""
    start, end = T0 + 45 * 60, T0 + 2 * 3600 + 30 * 60
    parts = split_by_hour(
        Interval(start, end, Usage(cpu_seconds=70, memory_mib_seconds=700, uptime_seconds=end - start))
    )
    hours = [hour.hour for hour, _ in parts]
    assert hours == [13, 14, 15]
    cpu = [round(usage.cpu_seconds, 9) for _, usage in parts]
    assert cpu == [10, 40, 20]
    assert [round(usage.uptime_seconds) for _, usage in parts] == [900, 3600, 1800]
    assert sum(usage.cpu_seconds for _, usage in parts) == pytest.approx(70)


def test_an_interval_ending_exactly_on_the_hour_has_no_empty_next_hour() -> None:
    parts = split_by_hour(Interval(T0 + 1800, T0 + 3600, Usage(1, 1, 1800)))
    assert [hour for hour, _ in parts] == [datetime(2026, 12, 3, 13, tzinfo=UTC)]


def test_an_instant_falls_in_its_hour() -> None:
    assert split_by_hour(Interval(T0 + 3600, T0 + 3600, Usage(0.5))) == [
        (datetime(2026, 12, 3, 14, tzinfo=UTC), Usage(0.5))
    ]


def test_hour_of_is_the_utc_hour_start() -> None:
    assert hour_of(T0 + 3599.9) == datetime(2026, 12, 3, 13, tzinfo=UTC)
    assert hour_of(T0 + 3600) == datetime(2026, 12, 3, 14, tzinfo=UTC)
    assert period_of(T0 + 119.9, 60) == datetime(2026, 12, 3, 13, 1, tzinfo=UTC)


def test_minutes_split_by_overlap_as_hours_do_and_sum_to_the_whole() -> None:
    """30 s before 13:01, a whole minute, 15 s after 13:02: 2/7, 4/7, 1/7 of 105 s."""
    start, end = T0 + 30, T0 + 135
    parts = split_by_minute(Interval(start, end, Usage(7, 70, end - start)), not_before=float("-inf"))
    assert [(at.hour, at.minute) for at, _ in parts] == [(13, 0), (13, 1), (13, 2)]
    assert [round(usage.cpu_seconds, 9) for _, usage in parts] == [2, 4, 1]
    assert [round(usage.uptime_seconds) for _, usage in parts] == [30, 60, 15]
    hours = split_by_hour(Interval(start, end, Usage(7, 70, end - start)))
    assert hours == [(datetime(2026, 12, 3, 13, tzinfo=UTC), Usage(7, 70, 105))]


def test_minutes_before_not_before_are_left_out_however_long_the_interval() -> None:
    """A process first seen after a year (backfill): only the minutes from the one holding
    `not_before` on, so a round writes no more minutes than the retention holds."""
    year = 365 * 24 * 3600
    parts = split_by_minute(Interval(T0 - year, T0 + 120, Usage(1, 1, year + 120)), not_before=T0 + 30)
    assert [at.minute for at, _ in parts] == [0, 1]
    assert sum(usage.uptime_seconds for _, usage in parts) == pytest.approx(120)
    instant = Interval(T0 + 30, T0 + 30, Usage(0.5))
    assert split_by_minute(instant, not_before=T0 + 60) == []
    assert split_by_minute(instant, not_before=T0 + 59) == [
        (datetime(2026, 12, 3, 13, tzinfo=UTC), Usage(0.5))
    ]


def hour_row(uid: str, name: str, hour: int, cpu: float, disk: int) -> HourUsage:
    return HourUsage(
        uid, "lab", name, datetime(2026, 12, 3, hour, tzinfo=UTC), Usage(cpu, cpu * 10, 3600), disk
    )


def test_the_report_totals_per_vm_and_project_with_hourly_points() -> None:
    """Per VM: sums, and the disk bytes of its latest hour; the project: sums of those. A VM
    re-created under the same name is a separate entry (another uid)."""
    rows = [
        hour_row("u1", "web", 13, 5, 100),
        hour_row("u1", "web", 14, 7, 300),
        hour_row("u2", "web", 14, 1, 50),
    ]
    start, end = datetime(2026, 12, 3, 13, tzinfo=UTC), datetime(2026, 12, 3, 15, tzinfo=UTC)
    report = build_report("lab", start, end, rows, points=True)
    first, second = report.vms
    assert (second.uid, second.name, second.total.cpu_seconds) == ("u2", "web", 1)
    assert (first.uid, first.total.cpu_seconds, first.total.disk_bytes) == ("u1", 12, 300)
    assert [point.cpu_seconds for point in first.points] == [5, 7]
    assert (report.total.cpu_seconds, report.total.disk_bytes, report.total.uptime_seconds) == (
        13,
        350,
        3 * 3600,
    )
    body = report.model_dump(mode="json", by_alias=True)
    assert (body["from"], body["kind"]) == ("2026-12-03T13:00:00Z", "UsageReport")
    assert body["vms"][0]["points"][0] == {
        "cpuSeconds": 5.0,
        "memoryMibSeconds": 50.0,
        "uptimeSeconds": 3600.0,
        "diskBytes": 100,
        "hour": "2026-12-03T13:00:00Z",
    }
    assert build_report("lab", start, end, rows, points=False).vms[0].points == ()


def test_usage_settings_defaults() -> None:
    """docs/usage.md: sampled every 15 s, kept 400 days, the minutes 48 hours (at least a day,
    the VM page's longest chart; at most 31 days)."""
    settings = ControllerSettings()
    assert settings.usage_sample_seconds == 15.0
    assert settings.usage_retention_days == 400
    assert settings.usage_minutes_retention_hours == 48
    with pytest.raises(ValueError, match="less than or equal to 744"):
        ControllerSettings(usage_minutes_retention_hours=745)
    for bad in (
        {"usage_sample_seconds": 0.5},
        {"usage_retention_days": 0},
        {"usage_minutes_retention_hours": 23},
    ):
        with pytest.raises(ValueError, match="greater than or equal"):
            ControllerSettings(**bad)
