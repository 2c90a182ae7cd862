"""A VM page's charts, pure: CPU and memory over the last hour and the last day from its usage
hours (docs/usage.md), and the timeline of its phases and restarts from its events.

The usage store keeps one row per VM and UTC hour, so a chart draws one bar per hour: the mean
while the VM was up (CPU in cores, memory in MiB of RSS). The last-hour chart shows the current
hour and the part of the previous one that falls in the window. Rows of several uids (a VM
re-created under the same name) add up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from api.charts import Interval, clock, esc, patterns_defs, step_chart
from api.timeline import LogEntry, summary, timeline, timeline_svg
from api.usage import HourUsage

HOUR = timedelta(hours=1)
WINDOWS = (("hour", "Last hour", HOUR), ("day", "Last day", timedelta(days=1)))


@dataclass(frozen=True, slots=True)
class Series:
    cpu_cores: tuple[Interval, ...]
    memory_mib: tuple[Interval, ...]


def series(hours: Iterable[HourUsage], now: datetime) -> Series:
    """Per hour (oldest first), the mean cores and MiB while up; an hour without uptime is left
    out. The current hour ends at `now`."""
    sums: dict[datetime, list[float]] = {}
    for row in hours:
        cpu, mem, up = sums.get(row.hour, [0.0, 0.0, 0.0])
        u = row.usage
        sums[row.hour] = [cpu + u.cpu_seconds, mem + u.memory_mib_seconds, up + u.uptime_seconds]
    cpu_points, memory_points = [], []
    for hour in sorted(sums):
        cpu, mem, up = sums[hour]
        if up <= 0:
            continue
        end = min(hour + HOUR, now)
        cpu_points.append(Interval(hour, end, cpu / up))
        memory_points.append(Interval(hour, end, mem / up))
    return Series(tuple(cpu_points), tuple(memory_points))


def latest_text(points: Sequence[Interval], unit: str, digits: int) -> str:
    """The text alternative of a chart: its latest value and the hour it is for."""
    if not points:
        return "no samples in this window"
    last = points[-1]
    return f"latest {last.value:.{digits}f} {unit} (mean of the hour from {clock(last.start)})"


def charts_section(
    hours: Sequence[HourUsage],
    events: Sequence[LogEntry],
    now: datetime,
    *,
    fragment_url: str,
    refresh_ms: int,
) -> str:
    """The charts as one <section> the script refreshes from `fragment_url`."""
    data = series(hours, now)
    panels = "".join(_panel(key, title, now - span, now, data, events) for key, title, span in WINDOWS)
    return (
        f'<section id="charts" aria-labelledby="h-charts" data-fragment="{esc(fragment_url)}"'
        f' data-refresh-ms="{refresh_ms}"><h2 id="h-charts">Usage and timeline</h2>{patterns_defs()}'
        f'<div class="panels">{panels}</div></section>'
    )


def _panel(
    key: str, title: str, start: datetime, end: datetime, data: Series, events: Sequence[LogEntry]
) -> str:
    def in_window(points: Sequence[Interval]) -> list[Interval]:
        return [p for p in points if p.end > start and p.start < end]

    cpu, memory = in_window(data.cpu_cores), in_window(data.memory_mib)
    line = timeline(events, start, end)
    figures = [
        ("cpu", "CPU", step_chart(f"CPU, {title.lower()}", cpu, start, end, unit="cores",
                                  text=latest_text(cpu, "cores", 2)), latest_text(cpu, "cores", 2)),
        ("memory", "Memory", step_chart(f"Memory, {title.lower()}", memory, start, end, unit="MiB",
                                        text=latest_text(memory, "MiB", 0), pattern="hatch"),
         latest_text(memory, "MiB", 0)),
        ("timeline", "Phases and restarts", timeline_svg(f"Timeline, {title.lower()}", line, start, end),
         summary(line)),
    ]  # fmt: skip
    body = "".join(
        f'<figure id="{kind}-{key}" class="chart-figure">{svg}'
        f'<figcaption><strong>{esc(name)}</strong>: <span class="alt">{esc(text)}</span></figcaption>'
        "</figure>"
        for kind, name, svg, text in figures
    )
    return f'<div class="panel" data-window="{key}"><h3>{esc(title)}</h3>{body}</div>'
