"""A VM's timeline, drawn from its event log: the phases it went through and its restarts. Pure.

The event log says when a phase began (`Started`, `BackOff`, `Stopped` …), not the phase
itself, so each phase lasts from its event to the next phase event, and the last one to `end`
(now). Before the first phase event of the window the phase is unknown and nothing is drawn.
A restart is a `Restarted` event (the controller's, whatever its cause: a crash or a request).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from api.charts import CHART_WIDTH, Interval, Rect, axis_ends, clock, esc, patterned_rect, step_rects

# The phase each event reason starts; other reasons (PortsAllocated, Killing …) change none.
PHASE_OF_REASON = {
    "Started": "Running",
    "Unpaused": "Running",
    "BackOff": "CrashLoopBackOff",
    "Stopping": "Stopping",
    "Stopped": "Stopped",
    "Paused": "Paused",
}
RESTART_REASON = "Restarted"
# Without colour, phases differ by pattern (api/charts.py PATTERNS).
PHASE_PATTERNS = {
    "Running": "solid",
    "CrashLoopBackOff": "cross",
    "Stopping": "hatch",
    "Stopped": "dots",
    "Paused": "vertical",
}
TIMELINE_HEIGHT = 26


@dataclass(frozen=True, slots=True)
class LogEntry:
    """What the timeline needs of an event."""

    time: datetime
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Segment:
    phase: str
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class Restart:
    at: datetime
    message: str


@dataclass(frozen=True, slots=True)
class Timeline:
    segments: tuple[Segment, ...]
    restarts: tuple[Restart, ...]


def timeline(entries: Sequence[LogEntry], start: datetime, end: datetime) -> Timeline:
    """The phases and restarts of `entries` (oldest first) within [start, end]: a phase that
    began before `start` is cut there; one that repeats (Running, then Running) is one segment."""
    changes: list[tuple[datetime, str]] = []
    for entry in entries:
        phase = PHASE_OF_REASON.get(entry.reason)
        if phase is not None and entry.time <= end and (not changes or changes[-1][1] != phase):
            changes.append((entry.time, phase))
    segments = []
    for index, (began, phase) in enumerate(changes):
        until = changes[index + 1][0] if index + 1 < len(changes) else end
        if until > start:
            segments.append(Segment(phase, max(began, start), until))
    restarts = tuple(
        Restart(e.time, e.message) for e in entries if e.reason == RESTART_REASON and start <= e.time <= end
    )
    return Timeline(tuple(segments), restarts)


def summary(line: Timeline) -> str:
    """The timeline in words: its text alternative."""
    if not line.segments:
        phases = "no phase change recorded in this window"
    else:
        last = line.segments[-1]
        phases = f"{last.phase} since {clock(last.start)}"
        earlier = sorted({s.phase for s in line.segments[:-1]})
        if earlier:
            phases += f" (before: {', '.join(earlier)})"
    count = len(line.restarts)
    restarts = "no restarts" if count == 0 else f"{count} restart{'s' if count > 1 else ''}"
    if count:
        restarts += f", the last at {clock(line.restarts[-1].at)}"
    return f"{phases}; {restarts}"


def timeline_svg(label: str, line: Timeline, start: datetime, end: datetime) -> str:
    """The segments as a band (pattern and label per phase), the restarts as ticks above it."""
    h = TIMELINE_HEIGHT
    parts = []
    for segment in line.segments:
        # A phase that lasted no time (two events at one instant) has no bar, only its words.
        drawn = step_rects([Interval(segment.start, segment.end, 1.0)], start, end, top=1.0, height=h)
        if not drawn:
            continue
        rect = drawn[0]
        pattern = PHASE_PATTERNS.get(segment.phase, "hatch")
        text = (
            f'<text class="part-label" x="{rect.x + 3:.1f}" y="{h - 8}">{esc(segment.phase)}</text>'
            if rect.width >= 7.5 * len(segment.phase)
            else ""
        )
        parts.append(
            f'<g class="segment phase-{esc(segment.phase)}" data-phase="{esc(segment.phase)}">'
            f"<title>{esc(segment.phase)} {clock(segment.start)}–{clock(segment.end)}</title>"
            f"{patterned_rect(Rect(rect.x, 0, max(rect.width, 1), h), pattern, 'fill')}{text}</g>"
        )
    span = (end - start).total_seconds() or 1.0
    for restart in line.restarts:
        x = CHART_WIDTH * (restart.at - start).total_seconds() / span
        parts.append(
            f'<g class="restart" data-at="{esc(restart.at.isoformat())}"><title>{esc(restart.message)}'
            f" at {clock(restart.at)}</title>"
            f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{h + 4}"/>'
            f'<path d="M{x - 5:.1f},-8 L{x + 5:.1f},-8 L{x:.1f},0 Z"/></g>'
        )
    axis = f'<rect class="meter-frame" x="0.5" y="0.5" width="{CHART_WIDTH - 1}" height="{h - 1}"/>'
    axis += axis_ends(start, end, h + 18)
    return (
        f'<svg class="timeline" role="img" viewBox="0 -10 {CHART_WIDTH} {h + 32}" width="{CHART_WIDTH}"'
        f' height="{h + 32}" data-restarts="{len(line.restarts)}">'
        f"<title>{esc(label)}: {esc(summary(line))}</title>"
        f"{''.join(parts)}{axis}</svg>"
    )
