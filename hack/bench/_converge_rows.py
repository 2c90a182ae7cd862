"""The converge benchmark's samples and rows, with their medians, ratios and JSON
(hack/bench/converge)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from _memory_guard import GIB

TARGET_RATIO = 1.10
POSTGRES_TARGET_RATIO = 1.15


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
        return max([s.foreign_cores for s in self.controller] + [s.foreign_cores for s in self.bare])

    def to_json(self) -> dict[str, Any]:
        if self.postgres:
            return {
                "count": self.count,
                "sqlite": [s.to_json() for s in self.controller],
                "postgres": [s.to_json() for s in self.postgres],
                "sqlite_median_s": self.controller_s,
                "postgres_median_s": self.postgres_s,
                "ratio": self.postgres_ratio,
                "target_ratio_max": POSTGRES_TARGET_RATIO,
                "pass": self.postgres_ratio <= POSTGRES_TARGET_RATIO,
            }
        return {
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
