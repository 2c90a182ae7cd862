"""hack/bench/idle --baseline-tree DIR: the same idle VMs measured under a second server that
runs another checkout's code (e.g. `git worktree add /tmp/base main`), in the same run, so
that both figures share the machine and its foreign load.

The baseline server adopts the VMs the first one left running (a SIGTERM leaves them for the
next controller), gets one resync period and a few seconds to settle, and is measured over the
same window. The controller's own counters (`/metrics`) say what each window did: reconciles,
QEMUs asked by the liveness pass, keys each resync queued or skipped (a baseline that predates
these counters shows none).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import BenchError, progress
from _server import Server

ADOPT_TIMEOUT_S = 180.0
COUNTERS = (
    "controller_runtime_reconcile_total",
    "tofu_qemu_liveness_asks_total",
    'tofu_qemu_resync_keys_total{outcome="queued"}',
    'tofu_qemu_resync_keys_total{outcome="skipped"}',
)
FULL_RESYNC_DEFAULT_S = 300.0


def counters(server: Server) -> dict[str, float]:
    """The COUNTERS from the server's /metrics (reconciles summed over results)."""
    status, body = server.request("GET", "/metrics")
    if status != 200:
        raise BenchError(f"GET /metrics answered {status}")
    found: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{", 1)[0]
        key = name if name == "controller_runtime_reconcile_total" else series
        if key in COUNTERS:
            found[key] = found.get(key, 0.0) + float(value)
    return found


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before.get(key, 0.0) for key in after}


def wait_adopted(server: Server, project: str, count: int) -> None:
    """Until the server lists `count` VMs of `project`, all Running."""
    deadline = time.monotonic() + ADOPT_TIMEOUT_S
    while time.monotonic() < deadline:
        phases = [item["status"].get("phase") for item in server.vms(project)]
        if len(phases) == count and all(phase == "Running" for phase in phases):
            return
        time.sleep(1.0)
    raise BenchError(f"the baseline server did not have {count} VMs Running within {ADOPT_TIMEOUT_S:.0f} s")


@dataclass(frozen=True, slots=True)
class Measured:
    """One server's window and what its counters say about it."""

    window: Any  # idle.Window
    counted: dict[str, float]


def measure_server(server: Server, measure: Callable[[int], Any], *, settle_s: float) -> Measured:
    """Let `server` settle, then measure it (`measure(pid)`) and its counters over the window."""
    time.sleep(settle_s)
    before = counters(server)
    window = measure(server.pid)
    return Measured(window, delta(before, counters(server)))


def measure_baseline(
    start: Callable[[], Server], measure: Callable[[int], Any], *, project: str, count: int, settle_s: float
) -> Measured:
    server = start()
    progress(f"baseline server (code of {server.tree}) adopting {count} VMs")
    wait_adopted(server, project, count)
    try:
        return measure_server(server, measure, settle_s=settle_s)
    finally:
        server.stop()


def per_100(value: float, vms: int) -> float:
    return value * 100 / vms


def report(
    new: Measured,
    base: Measured | None,
    resync_of: Callable[[Any], Any],
    *,
    vms: int,
    tree: Path | None,
    resync_period: float,
) -> dict[str, Any]:
    """Print the per-100-VM figures of this tree's server, beside the baseline's if measured."""
    columns = [("this tree", new)] + ([("baseline", base)] if base is not None else [])
    rows = _rows(columns, resync_of, vms)
    _print_rows(rows, len(columns), vms=vms, resync_period=resync_period)
    if base is not None:
        print(f"baseline: the code of {tree}")
    figures: dict[str, Any] = {label: values for label, values in rows.items()}
    if base is not None:
        figures["projected_default_pct_per_100"] = _print_projection(
            resync_of(new.window), resync_of(base.window), vms
        )
    print(
        "foreign load (other processes, cores): "
        + ", ".join(f"{name} {measured.window.foreign_cores:.2f}" for name, measured in columns)
    )
    figures["foreign_cores"] = [measured.window.foreign_cores for _, measured in columns]
    return figures


def _rows(
    columns: list[tuple[str, Measured]], resync_of: Callable[[Any], Any], vms: int
) -> dict[str, list[float]]:
    """Each row's value per column: CPU and resync cost per 100 VMs, and the controller's counters."""
    rows: dict[str, list[float]] = {}
    for _, measured in columns:
        window, resync = measured.window, resync_of(measured.window)
        rows.setdefault("CPU, % of a core per 100 VMs (schedstat)", []).append(per_100(window.oncpu_pct, vms))
        rows.setdefault("resync pass CPU ms per 100 VMs (median)", []).append(
            per_100(resync.cpu_s * 1000, vms)
        )
        rows.setdefault("background, % of a core per 100 VMs", []).append(
            per_100(resync.background_cpu_pct, vms)
        )
        rows.setdefault("reconciles in the window", []).append(
            measured.counted.get("controller_runtime_reconcile_total", 0.0)
        )
        rows.setdefault("QEMUs asked by the liveness pass", []).append(
            measured.counted.get("tofu_qemu_liveness_asks_total", float("nan"))
        )
        rows.setdefault("resync keys queued / skipped", []).append(
            measured.counted.get('tofu_qemu_resync_keys_total{outcome="queued"}', float("nan"))
        )
        rows["resync keys queued / skipped"].append(
            measured.counted.get('tofu_qemu_resync_keys_total{outcome="skipped"}', float("nan"))
        )
    return rows


def _print_rows(rows: dict[str, list[float]], columns: int, *, vms: int, resync_period: float) -> None:
    print()
    print(f"Per 100 VMs ({vms} measured, resync every {resync_period:g} s), side by side in one run:")
    print(f"{'':46}" + "".join(f"{name:>14}" for name in ("this tree", "baseline")[:columns]))
    for label, values in rows.items():
        if label == "resync keys queued / skipped":
            cells = [f"{values[i]:.0f}/{values[i + 1]:.0f}" for i in range(0, len(values), 2)]
        elif label.startswith(("reconciles", "QEMUs")):
            cells = [f"{value:.0f}" for value in values]
        else:
            cells = [f"{value:.3f}" for value in values]
        print(f"{label:46}" + "".join(f"{cell:>14}" for cell in cells))


def _print_projection(new_resync: Any, base_resync: Any, vms: int) -> float:
    """This tree's CPU at the default periods, per 100 VMs, printed beside the baseline's."""
    # At the defaults: the background, an incremental pass every 30 s, and a full pass (as
    # costly as the baseline's every-VM pass, which it is) every 300 s.
    projected = new_resync.background_cpu_pct + 100 * (
        new_resync.cpu_s / 30.0 + base_resync.cpu_s / FULL_RESYNC_DEFAULT_S
    )
    print(
        f"{'projected at the defaults, % per 100 VMs':46}{per_100(projected, vms):>14.3f}"
        f"{per_100(base_resync.projected_default_pct, vms):>14.3f}"
    )
    print(
        "  (this tree: background + its pass / 30 s + a full pass, costed as the baseline's pass, "
        "/ 300 s; baseline: background + its pass / 30 s)"
    )
    return per_100(projected, vms)
