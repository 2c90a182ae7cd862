"""The converge benchmark's samples and rows, with their medians, ratios and JSON
(hack/bench/converge)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from _memory_guard import GIB

TARGET_RATIO = 1.10
POSTGRES_TARGET_RATIO = 1.15
# Small runs take seconds and are noisy, large ones take a minute with their teardown.
SMALL_COUNT, SMALL_REPEAT, LARGE_REPEAT = 10, 5, 2


def repeats_for(count: int, asked: int | None) -> int:
    """--repeat, or the default for `count`."""
    return asked or (SMALL_REPEAT if count <= SMALL_COUNT else LARGE_REPEAT)


def mode_order(repeat: int, modes: tuple[str, ...]) -> tuple[str, ...]:
    """The modes in the order repeat number `repeat` runs them: each goes first in turn.
    Repeat 0 runs `modes[0]` (the controller) first, which bare needs for its argvs."""
    shift = repeat % len(modes)
    return modes[shift:] + modes[:shift]


@dataclass(frozen=True, slots=True)
class ControllerSample:
    seconds: float
    post_s: float
    first_spawn_s: float
    last_spawn_s: float
    api_confirmed: bool
    teardown_s: float
    foreign_cores: float
    server_cpu_s: float
    peak_rss_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "server_cpu_s": self.server_cpu_s,
            "peak_qemu_rss_bytes": self.peak_rss_bytes,
            "post_answered_s": self.post_s,
            "first_spawn_s": self.first_spawn_s,
            "last_spawn_s": self.last_spawn_s,
            "api_confirmed_running": self.api_confirmed,
            "teardown_s": self.teardown_s,
            "foreign_cores": self.foreign_cores,
        }


@dataclass(frozen=True, slots=True)
class BareSample:
    seconds: float
    foreign_cores: float
    peak_rss_bytes: int = 0


@dataclass(slots=True)
class Row:
    count: int
    controller: list[ControllerSample] = field(default_factory=list)
    bare: list[BareSample] = field(default_factory=list)
    # With --database-url: the same controller runs, on PostgreSQL.
    postgres: list[ControllerSample] = field(default_factory=list)
    # With --baseline-tree: the same runs, by a server running another checkout's code.
    baseline: list[ControllerSample] = field(default_factory=list)
    # With both: the baseline's runs on PostgreSQL (`baseline` holds its runs on SQLite).
    postgres_baseline: list[ControllerSample] = field(default_factory=list)

    @property
    def baseline_s(self) -> float:
        return statistics.median(s.seconds for s in self.baseline)

    @property
    def baseline_ratio(self) -> float:
        """Median this tree / median baseline."""
        return self.controller_s / self.baseline_s

    def cpu_ms_per_vm(self, samples: list[ControllerSample]) -> float:
        return statistics.median(s.server_cpu_s for s in samples) * 1000 / self.count

    @property
    def postgres_s(self) -> float:
        return statistics.median(s.seconds for s in self.postgres)

    @property
    def postgres_ratio(self) -> float:
        return self.postgres_s / self.controller_s

    @property
    def controller_s(self) -> float:
        return statistics.median(s.seconds for s in self.controller)

    @property
    def bare_s(self) -> float:
        return statistics.median(s.seconds for s in self.bare)

    @property
    def ratio(self) -> float:
        return self.controller_s / self.bare_s

    def median_of(self, name: str) -> float:
        return statistics.median(float(getattr(s, name)) for s in self.controller)

    @property
    def peak_rss_gib(self) -> float:
        samples = [*self.controller, *self.bare, *self.postgres]
        return max((s.peak_rss_bytes for s in samples), default=0) / GIB

    @property
    def foreign_max(self) -> float:
        samples = [*self.controller, *self.bare, *self.baseline]
        return max(s.foreign_cores for s in samples)

    def to_json(self) -> dict[str, Any]:
        if self.postgres:
            baseline_runs = (
                {
                    "baseline_sqlite": [s.to_json() for s in self.baseline],
                    "baseline_postgres": [s.to_json() for s in self.postgres_baseline],
                }
                if self.postgres_baseline
                else {}
            )
            return baseline_runs | {
                "count": self.count,
                "sqlite": [s.to_json() for s in self.controller],
                "postgres": [s.to_json() for s in self.postgres],
                "sqlite_median_s": self.controller_s,
                "postgres_median_s": self.postgres_s,
                "ratio": self.postgres_ratio,
                "target_ratio_max": POSTGRES_TARGET_RATIO,
                "pass": self.postgres_ratio <= POSTGRES_TARGET_RATIO,
            }
        baseline = (
            {
                "baseline": [s.to_json() for s in self.baseline],
                "baseline_median_s": self.baseline_s,
                "ratio_vs_baseline": self.baseline_ratio,
            }
            if self.baseline
            else {}
        )
        return baseline | {
            "count": self.count,
            "controller": [s.to_json() for s in self.controller],
            "bare_s": [s.seconds for s in self.bare],
            "bare_foreign_cores": [s.foreign_cores for s in self.bare],
            "bare_peak_qemu_rss_bytes": [s.peak_rss_bytes for s in self.bare],
            "controller_median_s": self.controller_s,
            "bare_median_s": self.bare_s,
            "ratio": self.ratio,
            "target_ratio_max": TARGET_RATIO,
            "pass": self.ratio <= TARGET_RATIO,
        }
