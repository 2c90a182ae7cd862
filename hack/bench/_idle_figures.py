"""Figures of hack/bench/idle: a process's measurement window, the bursts in its CPU trace, the
full resyncs among them, and the report against the targets."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from _common import verdict

CPU_TARGET_PCT = 1.0
RSS_TARGET_MB = 80.0
DEFAULT_RESYNC_S = 30.0
ACTIVE_SHARE = 0.05
# Active samples closer than this belong to one burst: min(1 s, a quarter of the resync period).
# A resync on a loaded machine pauses whenever the server is descheduled; they must not split it.
BURST_GAP_MAX_S = 1.0
MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Burst:
    start: float
    duration_s: float
    cpu_s: float


@dataclass(slots=True)
class Window:
    """What one process used during the measurement window."""

    seconds: float
    cpu_s: float
    rss_start: int
    rss_end: int
    rss_max: int
    qemu_cpu_s: float
    foreign_cores: float
    samples: list[tuple[float, int]] = field(default_factory=list)
    # CPU seconds of the QEMUs whose guest had booted by the end of the window, and of the rest.
    booted: list[float] = field(default_factory=list)
    booting: list[float] = field(default_factory=list)

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.seconds

    @property
    def oncpu_s(self) -> float:
        """The same CPU from schedstat: exact, where utime+stime counts 10 ms ticks."""
        return (self.samples[-1][1] - self.samples[0][1]) / 1e9 if self.samples else 0.0

    @property
    def oncpu_pct(self) -> float:
        return 100 * self.oncpu_s / self.seconds

    def bursts(self, gap: float) -> list[Burst]:
        """Runs of active samples (> ACTIVE_SHARE of a core) less than `gap` seconds apart."""
        bursts: list[Burst] = []
        current: list[tuple[float, float]] = []  # (sample time, CPU seconds in the sample)
        for (t0, ns0), (t1, ns1) in zip(self.samples, self.samples[1:], strict=False):
            used = (ns1 - ns0) / 1e9
            if used <= ACTIVE_SHARE * (t1 - t0):
                continue
            if current and t1 - current[-1][0] > gap:
                bursts.append(_burst(current))
                current = []
            current.append((t1, used))
            # The first sample of a burst starts when its interval started.
            if len(current) == 1:
                current.insert(0, (t0, 0.0))
        if current:
            bursts.append(_burst(current))
        return bursts

    def to_json(self, *, gap: float) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "cpu_s": self.cpu_s,
            "cpu_pct_of_core": self.cpu_pct,
            "rss_start_bytes": self.rss_start,
            "rss_end_bytes": self.rss_end,
            "rss_max_bytes": self.rss_max,
            "qemu_cpu_s": self.qemu_cpu_s,
            "foreign_cores": self.foreign_cores,
            "bursts": [
                {"start": b.start, "duration_s": b.duration_s, "cpu_s": b.cpu_s} for b in self.bursts(gap)
            ],
            "booted_qemu_cpu_s": self.booted,
            "booting_qemu_cpu_s": self.booting,
        }


def _burst(points: list[tuple[float, float]]) -> Burst:
    return Burst(points[0][0], points[-1][0] - points[0][0], sum(used for _, used in points))


@dataclass(frozen=True, slots=True)
class ResyncFigures:
    count: int
    duration_s: float
    cpu_s: float
    background_cpu_pct: float
    projected_default_pct: float


def burst_gap(period: float) -> float:
    return min(BURST_GAP_MAX_S, period / 4)


def resync_figures(window: Window, period: float) -> ResyncFigures:
    """Bursts that recur with the resync period are resyncs: take the largest window/period ones."""
    bursts = window.bursts(burst_gap(period))
    expected = max(1, round(window.seconds / period))
    resyncs = sorted(bursts, key=lambda b: b.cpu_s, reverse=True)[:expected]
    if not resyncs:
        return ResyncFigures(0, 0.0, 0.0, window.cpu_pct, window.cpu_pct)
    resync_cpu = sum(b.cpu_s for b in resyncs)
    total_ns = (window.samples[-1][1] - window.samples[0][1]) / 1e9
    background = max(0.0, total_ns - resync_cpu) / window.seconds
    per_resync = statistics.median(b.cpu_s for b in resyncs)
    return ResyncFigures(
        count=len(resyncs),
        duration_s=statistics.median(b.duration_s for b in resyncs),
        cpu_s=per_resync,
        background_cpu_pct=100 * background,
        projected_default_pct=100 * (background + per_resync / DEFAULT_RESYNC_S),
    )


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    controller: Window = result["controller"]
    bare: Window = result["bare"]
    resync = resync_figures(controller, args.resync_seconds)
    bare_resync = resync_figures(bare, args.resync_seconds)
    targets = {
        "cpu_pct_max": CPU_TARGET_PCT,
        "cpu_pass": controller.cpu_pct < CPU_TARGET_PCT,
        "projected_cpu_pass": resync.projected_default_pct < CPU_TARGET_PCT,
        "rss_mb_max": RSS_TARGET_MB,
        "rss_pass": controller.rss_max / MB < RSS_TARGET_MB,
    }
    floor_mb = result["import_floor_rss"] / MB
    _print_server_table(controller, bare, (resync, bare_resync), targets, args, floor_mb)
    guest_pct = 100 * controller.qemu_cpu_s / controller.seconds
    booted_pct = 100 * statistics.median(controller.booted) / controller.seconds if controller.booted else 0.0
    booting_pct = (
        100 * statistics.median(controller.booting) / controller.seconds if controller.booting else 0.0
    )
    _print_guests(result, controller, bare, args, (guest_pct, booted_pct, booting_pct))
    return {
        "resync": asdict(resync),
        "bare_resync": asdict(bare_resync),
        "server_cpu_pct": controller.cpu_pct,
        "bare_cpu_pct": bare.cpu_pct,
        "server_oncpu_pct": controller.oncpu_pct,
        "bare_oncpu_pct": bare.oncpu_pct,
        "projected_default_resync_cpu_pct": resync.projected_default_pct,
        "resync_cpu_s": resync.cpu_s,
        "resync_duration_s": resync.duration_s,
        "background_cpu_pct": resync.background_cpu_pct,
        "server_rss_max_mb": controller.rss_max / MB,
        "bare_rss_max_mb": bare.rss_max / MB,
        "import_floor_rss_mb": floor_mb,
        "guest_cpu_pct_each": guest_pct / args.vms,
        "booted_guest_cpu_pct_median": booted_pct,
        "booting_guest_cpu_pct_median": booting_pct,
        "targets": targets,
    }


def _print_server_table(
    controller: Window,
    bare: Window,
    resyncs: tuple[ResyncFigures, ResyncFigures],
    targets: dict[str, Any],
    args: argparse.Namespace,
    floor_mb: float,
) -> None:
    """The server against the bare holder, row by row, with the targets' verdicts."""
    resync, bare_resync = resyncs
    cpu_pass, projected_pass = targets["cpu_pass"], targets["projected_cpu_pass"]
    rss_pass = targets["rss_pass"]
    rss_mb = controller.rss_max / MB
    width = 44
    print()
    print(
        f"Idle: {args.vms} VMs Running, nothing to do; --resync-seconds {args.resync_seconds:g}; "
        f"window {controller.seconds:.1f} s"
    )
    print(f"{'':{width}} {'server':>10} {'bare':>10} {'ratio':>7}   target")
    print("-" * (width + 60))
    print(
        f"{'CPU, % of one core (utime+stime)':{width}} {controller.cpu_pct:>10.2f} {bare.cpu_pct:>10.2f} "
        f"{'':>7}   < {CPU_TARGET_PCT:g} %  {verdict(cpu_pass)}"
    )
    print(
        f"{'  the same from schedstat (exact)':{width}} {controller.oncpu_pct:>10.2f} "
        f"{bare.oncpu_pct:>10.2f} {_ratio(controller.oncpu_s, bare.oncpu_s):>7.1f}"
    )
    print(
        f"{'  projected at the default resync (30 s)':{width}} {resync.projected_default_pct:>10.2f} "
        f"{bare_resync.projected_default_pct:>10.2f} "
        f"{_ratio(resync.projected_default_pct, bare_resync.projected_default_pct):>7.1f}   "
        f"< {CPU_TARGET_PCT:g} %  {verdict(projected_pass)}"
    )
    print(
        f"{'  background, outside resyncs (% of core)':{width}} {resync.background_cpu_pct:>10.2f} "
        f"{bare_resync.background_cpu_pct:>10.2f}"
    )
    print(
        f"{'full resync: CPU ms (median)':{width}} {resync.cpu_s * 1000:>10.1f} "
        f"{bare_resync.cpu_s * 1000:>10.1f} {_ratio(resync.cpu_s, bare_resync.cpu_s):>7.1f}"
    )
    print(
        f"{'full resync: wall ms (median, from CPU trace)':{width}} {resync.duration_s * 1000:>10.1f} "
        f"{bare_resync.duration_s * 1000:>10.1f} {_ratio(resync.duration_s, bare_resync.duration_s):>7.1f}"
    )
    print(f"{'  resyncs found / expected':{width}} {resync.count:>10} {bare_resync.count:>10}")
    print(
        f"{'RSS MB (max in window)':{width}} {rss_mb:>10.1f} {bare.rss_max / MB:>10.1f} "
        f"{_ratio(controller.rss_max, bare.rss_max):>7.1f}   < {RSS_TARGET_MB:g} MB  {verdict(rss_pass)}"
    )
    print(
        f"{'  RSS MB at start / end of window':{width}} "
        f"{f'{controller.rss_start / MB:.1f}/{controller.rss_end / MB:.1f}':>10} "
        f"{f'{bare.rss_start / MB:.1f}/{bare.rss_end / MB:.1f}':>10}"
    )
    print(f"{'  import floor: python + controller.cli, MB':{width}} {floor_mb:>10.1f}")


def _print_guests(
    result: dict[str, Any],
    controller: Window,
    bare: Window,
    args: argparse.Namespace,
    pcts: tuple[float, float, float],
) -> None:
    """The guests' own CPU (not the server's) and what else ran on the machine."""
    guest_pct, booted_pct, booting_pct = pcts
    print()
    print(
        f"guests (not the server): {args.vms} QEMUs used {guest_pct:.1f} % of a core in the server's window; "
        f"median per QEMU: {booted_pct:.2f} % for the {len(controller.booted)} booted (idle) guests, "
        f"{booting_pct:.1f} % for the {len(controller.booting)} still booting "
        "(docs/guest.md: ~0.3 % per idle q35 guest)"
    )
    print(
        f"guests booted before the window: {result['guests_ready']}/{args.vms} "
        f"after {result['boot_seconds']:.0f} s"
    )
    if result["guests_ready"] < args.vms:
        print(
            f"note: {args.vms - result['guests_ready']} guests were still booting during the windows: the "
            "machine was CPU-saturated, which stretches wall times (resync duration) more than CPU-seconds"
        )
    print(f"server log events in the window: {result['log_events_in_window'] or 'none'}")
    print(
        f"other processes on the machine: {controller.foreign_cores:.2f} cores (server window), "
        f"{bare.foreign_cores:.2f} cores (bare window)"
    )
    print(
        "resync duration: the server logs no resync event, so it is read from its CPU trace "
        f"(schedstat every {args.sample_ms:g} ms; see --help)"
    )


def _ratio(value: float, base: float) -> float:
    return value / base if base > 0 else float("inf")
