"""Usage metering math: from two looks at a VM's QEMU to the usage between them, per UTC hour
and per UTC minute.

Pure: the sampler (controller/usage_sampler.py) reads /proc and the disks and stores the result.

Counting is by deltas between consecutive samples of one process, never by totals:
- a process is known by (pid, start_ticks); the cursor is the last sample counted, and it is
  stored with the usage it completed, so a controller restart resumes from it exactly;
- a process the cursor does not name (QEMU restarted, or seen for the first time) is counted from
  its own start: its counters began at zero then. What a previous process used after its last
  sample is not visible any more once it exited, so at most one sample period of it is lost;
- the usage of an interval is spread over the hours it overlaps, in proportion to the overlap,
  and the same way over the minutes of the fine series the VM page's charts draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from api.usage import Cursor, Usage

MIB = 1024 * 1024
HOUR_SECONDS = 3600.0
MINUTE_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One look at a VM's QEMU from the host. Times are epoch seconds."""

    pid: int
    start_ticks: int
    started_at: float
    cpu_ticks: int  # utime + stime: every thread of QEMU, vCPUs and its own
    rss_bytes: int
    at: float

    def cursor(self) -> Cursor:
        return Cursor(self.pid, self.start_ticks, self.cpu_ticks, self.rss_bytes, self.at)

    def continues(self, cursor: Cursor | None) -> bool:
        """Whether `cursor` is a sample of this same process."""
        return cursor is not None and (cursor.pid, cursor.start_ticks) == (self.pid, self.start_ticks)


@dataclass(frozen=True, slots=True)
class Interval:
    """Usage between two instants (epoch seconds)."""

    start: float
    end: float
    usage: Usage


def usage_since(
    cursor: Cursor | None, sample: ProcessSample, *, ticks_per_second: int, backfill_limit: float
) -> Interval:
    """What the VM used from `cursor` (its last counted sample) to `sample`.

    Memory is integrated with the trapezoid rule between samples; a process counted from its
    start is taken to have held nothing at that start. `backfill_limit` (seconds) bounds how far
    back a process first seen long after its start is counted (an upgrade to metering).
    """
    if cursor is not None and sample.continues(cursor):
        start = min(cursor.at, sample.at)
        cpu_ticks = max(0, sample.cpu_ticks - cursor.cpu_ticks)
        rss_before = cursor.rss_bytes
    else:
        # A new process: it began after the previous one's last sample, whatever the clocks say.
        start = min(sample.started_at, sample.at)
        if cursor is not None:
            start = max(start, min(cursor.at, sample.at))
        start = max(start, sample.at - backfill_limit)
        cpu_ticks = sample.cpu_ticks
        rss_before = 0
    seconds = sample.at - start
    memory = (rss_before + sample.rss_bytes) / 2 / MIB * seconds
    return Interval(start, sample.at, Usage(cpu_ticks / ticks_per_second, memory, seconds))


def period_of(epoch: float, seconds: float = HOUR_SECONDS) -> datetime:
    """The start of the UTC period of `seconds` (an hour, a minute) holding `epoch`."""
    return datetime.fromtimestamp(epoch - epoch % seconds, UTC)


def hour_of(epoch: float) -> datetime:
    """The start of the UTC hour holding `epoch`."""
    return period_of(epoch, HOUR_SECONDS)


def split_by(
    interval: Interval, seconds: float, *, not_before: float = float("-inf")
) -> list[tuple[datetime, Usage]]:
    """`interval`'s usage spread over the UTC periods of `seconds` (hours, minutes) it overlaps,
    in proportion to the overlap; an instant (start == end) falls wholly in its period. The parts
    sum to the whole, less the parts of periods that end by `not_before` (epoch seconds): a
    series kept for a short time needs no parts older than that, however long the interval."""
    if interval.end <= interval.start:
        period = period_of(interval.end, seconds)
        return [] if period.timestamp() + seconds <= not_before else [(period, interval.usage)]
    length = interval.end - interval.start
    parts: list[tuple[datetime, Usage]] = []
    begin = period_of(max(interval.start, not_before), seconds).timestamp()
    if begin <= interval.start and interval.end <= begin + seconds:
        # Within one period (most of a sampler's rounds): the whole usage, nothing to scale.
        return [(datetime.fromtimestamp(begin, UTC), interval.usage)]
    while begin < interval.end:
        overlap = min(interval.end, begin + seconds) - max(interval.start, begin)
        if overlap > 0:
            parts.append((datetime.fromtimestamp(begin, UTC), interval.usage.scaled(overlap / length)))
        begin += seconds
    return parts


def split_by_hour(interval: Interval) -> list[tuple[datetime, Usage]]:
    """`interval`'s usage per UTC hour (`split_by`): what the hourly sums add."""
    return split_by(interval, HOUR_SECONDS)


def split_by_minute(interval: Interval, *, not_before: float) -> list[tuple[datetime, Usage]]:
    """`interval`'s usage per UTC minute from the minute holding `not_before` on (`split_by`):
    what the fine series, kept usage_minutes_retention_hours, adds."""
    return split_by(interval, MINUTE_SECONDS, not_before=not_before)
