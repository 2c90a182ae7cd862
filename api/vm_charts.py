"""A VM page's charts, pure: CPU and memory over the last hour and the last day from its usage
per minute (docs/usage.md), and the timeline of its phases and restarts from its events.

The store sums the VM's minutes into a window's bars (api/store/usage_minutes.py): the last hour
has a bar a minute (60), the last day one per 15 minutes (96). A bar is the mean while the VM
was up (CPU in cores, memory in MiB of RSS); the current bar ends at `now`. Rows of several uids
(a VM re-created under the same name) add up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from api.charts import Interval, clock, esc, patterns_defs, step_chart
from api.timeline import LogEntry, summary, timeline, timeline_svg
from api.usage import SpanUsage


@dataclass(frozen=True, slots=True)
class Window:
    key: str
    title: str
    span: timedelta
    step: timedelta  # one bar's time

    @property
    def bars(self) -> int:
        return round(self.span / self.step)


WINDOWS = (
    Window("hour", "Last hour", timedelta(hours=1), timedelta(minutes=1)),
    Window("day", "Last day", timedelta(days=1), timedelta(minutes=15)),
)


@dataclass(frozen=True, slots=True)
class Series:
    cpu_cores: tuple[Interval, ...]
    memory_mib: tuple[Interval, ...]


def series(spans: Iterable[SpanUsage], now: datetime) -> Series:
    """Per span (oldest first), the mean cores and MiB while up; a span without uptime is left
    out. The current span ends at `now`."""
    cpu_points, memory_points = [], []
    for span in sorted(spans, key=lambda s: s.start):
        up = span.usage.uptime_seconds
        if up <= 0:
            continue
        end = min(span.start + span.length, now)
        cpu_points.append(Interval(span.start, end, span.usage.cpu_seconds / up))
        memory_points.append(Interval(span.start, end, span.usage.memory_mib_seconds / up))
    return Series(tuple(cpu_points), tuple(memory_points))


def latest_text(points: Sequence[Interval], unit: str, digits: int, step: timedelta) -> str:
    """The text alternative of a chart: its latest value and the bar it is for."""
    if not points:
        return "no samples in this window"
    last = points[-1]
    minutes = round(step.total_seconds() / 60)
    period = "the minute" if minutes == 1 else f"the {minutes} minutes"
    return f"latest {last.value:.{digits}f} {unit} (mean of {period} from {clock(last.start)})"


def charts_section(
    usage: Mapping[str, Sequence[SpanUsage]],
    events: Sequence[LogEntry],
    now: datetime,
    *,
    fragment_url: str,
    refresh_ms: int,
) -> str:
    """The charts as one <section> the script refreshes from `fragment_url`; `usage` holds each
    window's bars by its key."""
    panels = "".join(
        _panel(window, now, series(usage.get(window.key, ()), now), events) for window in WINDOWS
    )
    return (
        f'<section id="charts" aria-labelledby="h-charts" data-fragment="{esc(fragment_url)}"'
        f' data-refresh-ms="{refresh_ms}"><h2 id="h-charts">Usage and timeline</h2>{patterns_defs()}'
        f'<div class="panels">{panels}</div></section>'
    )


def _panel(window: Window, end: datetime, data: Series, events: Sequence[LogEntry]) -> str:
    key, title, start = window.key, window.title, end - window.span

    def in_window(points: Sequence[Interval]) -> list[Interval]:
        return [p for p in points if p.end > start and p.start < end]

    cpu, memory = in_window(data.cpu_cores), in_window(data.memory_mib)
    cpu_text = latest_text(cpu, "cores", 2, window.step)
    memory_text = latest_text(memory, "MiB", 0, window.step)
    line = timeline(events, start, end)
    figures = [
        ("cpu", "CPU", step_chart(f"CPU, {title.lower()}", cpu, start, end, unit="cores",
                                  text=cpu_text), cpu_text),
        ("memory", "Memory", step_chart(f"Memory, {title.lower()}", memory, start, end, unit="MiB",
                                        text=memory_text, pattern="hatch"),
         memory_text),
        ("timeline", "Phases and restarts", timeline_svg(f"Timeline, {title.lower()}", line, start, end),
         summary(line)),
    ]  # fmt: skip
    body = "".join(
        f'<figure id="{kind}-{key}" class="chart-figure">{svg}'
        f'<figcaption><strong>{esc(name)}</strong>: <span class="alt">{esc(text)}</span></figcaption>'
        "</figure>"
        for kind, name, svg, text in figures
    )
    step = round(window.step.total_seconds())
    return (
        f'<div class="panel" data-window="{key}" data-step-seconds="{step}"><h3>{esc(title)}</h3>{body}</div>'
    )
