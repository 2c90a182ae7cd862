"""hack/bench/converge --baseline-tree DIR: a second server running another checkout's code
(e.g. the commit before a change), timed in the same repeats as this tree's server and bare
QEMU, so that all three share the machine and its foreign load."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _common import verdict
from _converge_rows import Row
from _server import Server
from _workspace import Workspace

BASELINE_MODE = "baseline"
# The baseline server's host ports, apart from the others' (_common.PORT_RANGE, PostgreSQL's).
BASELINE_PORT_RANGE = "47000-47999"
# Issue 16's bound: this tree may cost at most 5 % more than the baseline.
BASELINE_TARGET_RATIO = 1.05


def add_tree_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="also time a server running the code of this checkout, in the same repeats",
    )
    parser.add_argument(
        "--tree",
        type=Path,
        help="time a server running the code of this checkout instead of this one's, so that two"
        " older builds meet with today's bench (with --baseline-tree)",
    )


def start_baseline(workspace: Workspace, tree: Path) -> Server:
    """The baseline server: its own data dir, this run's images, the code of `tree`."""
    if not (tree / "controller" / "cli.py").is_file():
        raise SystemExit(f"--baseline-tree {tree}: not a tofu-qemu checkout (no controller/cli.py)")
    return workspace.start_server(
        "server-base",
        data_dir=workspace.root / "data-base",
        tree=tree.resolve(),
        extra_args=(
            *("--images-dir", str(workspace.images_dir)),
            *("--port-range", BASELINE_PORT_RANGE),
        ),
    )


def report_baseline(rows: list[Row], tree: Path, this: Path | None = None) -> None:
    print()
    timed = f"The code of {this}" if this else "This tree"
    print(f"{timed} vs the baseline (the code of {tree}), same repeats: state POST -> all N Running")
    header = (
        f"{'N':>4} {'this s':>8} {'base s':>8} {'ratio':>7} {'target':>7}  {'spread this':>15} "
        f"{'spread base':>15}  {'cpu ms/VM':>9} {'base':>6}  {'vs bare':>7} {'base':>6}  result"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if not row.baseline:
            continue
        print(
            f"{row.count:>4} {row.controller_s:>8.3f} {row.baseline_s:>8.3f} {row.baseline_ratio:>7.2f} "
            f"{'<= ' + format(BASELINE_TARGET_RATIO, '.2f'):>7}  {_spread(row, this=True):>15} "
            f"{_spread(row, this=False):>15}  {row.cpu_ms_per_vm(row.controller):>9.1f} "
            f"{row.cpu_ms_per_vm(row.baseline):>6.1f}  {row.ratio:>7.2f} "
            f"{statistics.median(s.seconds for s in row.baseline) / row.bare_s:>6.2f}  "
            f"{verdict(row.baseline_ratio <= BASELINE_TARGET_RATIO)}"
        )
    print()
    print("spread = fastest-slowest run (s); cpu ms/VM = each server's on-CPU time per VM (median);")
    print("vs bare = each server's median over the bare median of the same repeats.")


def _spread(row: Row, *, this: bool) -> str:
    samples = [s.seconds for s in (row.controller if this else row.baseline)]
    return f"{min(samples):.3f}-{max(samples):.3f}"
