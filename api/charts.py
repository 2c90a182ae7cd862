"""The dashboard's charts as SVG text: geometry and markup, pure (no I/O, `now` is an argument).

Invariants:
- Every chart is an `<svg role="img">` whose `<title>` is its text alternative: the latest
  values in words, the same text the page shows under it. A chart is readable without colour:
  every series and part has a fill pattern of its own (`PATTERNS`) and a text label.
- Colours come from style.css classes only (which follow `prefers-color-scheme`); no `style`
  attribute, so the page's Content-Security-Policy (no inline style) holds. Text is escaped.
- Geometry is computed separately from markup (`meter_width`, `step_rects`, `nice_top`) so it
  can be table-tested.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

# One pattern per kind of part, so parts differ without colour: (id, what it draws).
PATTERNS = {
    "solid": "",
    "hatch": '<path d="M0,6 L6,0" class="pattern-line"/>',
    "cross": '<path d="M0,0 L6,6 M0,6 L6,0" class="pattern-line"/>',
    "dots": '<circle cx="3" cy="3" r="1.2" class="pattern-dot"/>',
    "vertical": '<path d="M3,0 L3,6" class="pattern-line"/>',
}
CHART_WIDTH = 600
CHART_HEIGHT = 120
METER_WIDTH = 300
METER_HEIGHT = 18


@dataclass(frozen=True, slots=True)
class Rect:
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True, slots=True)
class Interval:
    """A value that held from `start` to `end` (an hour's mean, a phase)."""

    start: datetime
    end: datetime
    value: float


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _n(value: float) -> str:
    """A coordinate, short: 12.5, 3, 0.33."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def nice_top(largest: float) -> float:
    """The top of a value axis: the smallest 1, 2 or 5 × 10^n at or above `largest` (1 for
    nothing to show, so an empty chart still has an axis)."""
    if largest <= 0 or not math.isfinite(largest):
        return 1.0
    power = 10 ** math.floor(math.log10(largest))
    for step in (1, 2, 5, 10):
        if step * power >= largest * (1 - 1e-9):
            return float(step * power)
    return float(10 * power)  # pragma: no cover - the loop always returns


def meter_width(used: float, capacity: float, width: float = METER_WIDTH) -> float:
    """How much of a capacity bar `used` fills: clamped to the bar (over-committed is full)."""
    if capacity <= 0:
        return 0.0
    return max(0.0, min(width, width * used / capacity))


def step_rects(
    intervals: Sequence[Interval],
    start: datetime,
    end: datetime,
    *,
    top: float,
    width: float = CHART_WIDTH,
    height: float = CHART_HEIGHT,
) -> list[Rect]:
    """One bar per interval over the window [start, end): each clipped to the window, as wide as
    the time it covers there, as tall as its value against `top`. Intervals outside are left out."""
    span = (end - start).total_seconds()
    rects = []
    for interval in intervals:
        left, right = max(interval.start, start), min(interval.end, end)
        if right <= left or span <= 0:
            continue
        x = width * (left - start).total_seconds() / span
        w = width * (right - left).total_seconds() / span
        h = height * max(0.0, min(interval.value, top)) / top
        rects.append(Rect(x, height - h, w, h))
    return rects


def patterned_rect(rect: Rect, pattern: str, css_class: str) -> str:
    """A rect coloured by its CSS class, then the pattern over it (none for "solid"), so that
    parts differ in colour and, for those who cannot tell colours apart, in texture."""
    box = f'x="{_n(rect.x)}" y="{_n(rect.y)}" width="{_n(rect.width)}" height="{_n(rect.height)}"'
    texture = (
        "" if pattern == "solid" else f'<rect class="texture" {box} fill="url(#pattern-{esc(pattern)})"/>'
    )
    return f'<rect class="{esc(css_class)}" {box}/>{texture}'


def patterns_defs() -> str:
    """The fill patterns, once per page (ids are page-wide): `url(#pattern-NAME)`."""
    bodies = "".join(
        f'<pattern id="pattern-{name}" width="6" height="6" patternUnits="userSpaceOnUse">{body}</pattern>'
        for name, body in PATTERNS.items()
        if body
    )
    hidden = 'width="0" height="0" aria-hidden="true" focusable="false"'
    return f'<svg class="defs" {hidden}><defs>{bodies}</defs></svg>'


def meter(label: str, used: float, capacity: float, *, text: str, pattern: str = "hatch") -> str:
    """A capacity bar: the outline is the capacity, the filled part what is allocated, `text`
    (e.g. "6 of 16 vCPUs") beside it and as its title."""
    fill = meter_width(used, capacity)
    over = " over" if capacity > 0 and used > capacity else ""
    return (
        f'<svg class="meter{over}" role="img" viewBox="0 0 {METER_WIDTH} {METER_HEIGHT}"'
        f' width="{METER_WIDTH}" height="{METER_HEIGHT}"'
        f' data-used="{esc(used)}" data-capacity="{esc(capacity)}">'
        f"<title>{esc(label)}: {esc(text)}</title>"
        f'<rect class="meter-frame" x="0.5" y="0.5" width="{METER_WIDTH - 1}" height="{METER_HEIGHT - 1}"/>'
        f"{patterned_rect(Rect(0, 0, fill, METER_HEIGHT), pattern, 'meter-fill')}</svg>"
    )


def stacked(label: str, parts: Sequence[tuple[str, int, str]], *, text: str) -> str:
    """One bar split into parts (name, count, pattern) in proportion, each part labelled with
    its name and count when it is wide enough; `text` is the title."""
    total = sum(count for _, count, _ in parts)
    x = 0.0
    pieces = []
    for name, count, pattern in parts:
        if count <= 0 or total <= 0:
            continue
        w = CHART_WIDTH * count / total
        pieces.append(
            f'<g class="part phase-{esc(name)}" data-part="{esc(name)}" data-count="{count}">'
            + patterned_rect(Rect(x, 0, w, 28), pattern, "fill")
            + (
                f'<text x="{_n(x + 4)}" y="19" class="part-label">{esc(name)} {count}</text>'
                if w >= 8 * (len(name) + 3)
                else ""
            )
            + "</g>"
        )
        x += w
    return (
        f'<svg class="stacked" role="img" viewBox="0 0 {CHART_WIDTH} 28" width="{CHART_WIDTH}" height="28">'
        f"<title>{esc(label)}: {esc(text)}</title>"
        f'<rect class="meter-frame" x="0.5" y="0.5" width="{CHART_WIDTH - 1}" height="27"/>'
        f"{''.join(pieces)}</svg>"
    )


def step_chart(
    label: str,
    intervals: Sequence[Interval],
    start: datetime,
    end: datetime,
    *,
    unit: str,
    text: str,
    pattern: str = "solid",
) -> str:
    """A bar per interval over [start, end), with the axis top and the window's ends written as
    text; `text` (the latest value) is the title and the chart's `data-samples` its bar count."""
    top = nice_top(max((i.value for i in intervals), default=0.0))
    rects = step_rects(intervals, start, end, top=top)
    bars = "".join(patterned_rect(r, pattern, "bar") for r in rects)
    h = CHART_HEIGHT
    axis = (
        f'<line class="axis" x1="0" y1="{h}" x2="{CHART_WIDTH}" y2="{h}"/>'
        f'<line class="grid" x1="0" y1="0.5" x2="{CHART_WIDTH}" y2="0.5"/>'
        f'<text class="tick" x="{CHART_WIDTH - 2}" y="12" text-anchor="end">'
        f"{esc(_fmt(top))} {esc(unit)}</text>"
        f"{axis_ends(start, end, h + 14)}"
    )
    return (
        f'<svg class="chart" role="img" viewBox="0 0 {CHART_WIDTH} {h + 18}" width="{CHART_WIDTH}"'
        f' height="{h + 18}" data-samples="{len(rects)}"><title>{esc(label)}: {esc(text)}</title>'
        f"{bars}{axis}</svg>"
    )


def _fmt(value: float) -> str:
    return f"{value:g}"


def clock(at: datetime, *, day: bool = False) -> str:
    """A time as a chart's axis says it: "16:10 UTC", or with `day` "Thu 16:10 UTC"."""
    return at.strftime("%a %H:%M UTC" if day else "%H:%M UTC")


def axis_ends(start: datetime, end: datetime, y: float) -> str:
    """The window's two ends written under a chart; with the weekday when it spans over an hour."""
    day = (end - start).total_seconds() > 3600
    return (
        f'<text class="tick" x="0" y="{_n(y)}">{esc(clock(start, day=day))}</text>'
        f'<text class="tick" x="{CHART_WIDTH}" y="{_n(y)}" text-anchor="end">'
        f"{esc(clock(end, day=day))}</text>"
    )
