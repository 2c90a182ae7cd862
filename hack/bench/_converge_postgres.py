"""hack/bench/converge --database-url: the same converge on PostgreSQL and on SQLite, and with
--baseline-tree DIR on both engines again by servers running another checkout's code, every
server taking its turn in each repeat, so that before and after share the machine's load."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

from _common import install_guest, progress, verdict
from _converge_rows import POSTGRES_TARGET_RATIO, ControllerSample, Row, mode_order, repeats_for
from _procfs import wait_quiet
from _server import Server
from _workspace import Workspace

# Each server's host ports, apart from the others' (_common.PORT_RANGE is the SQLite server's).
PORT_RANGES = {"postgres": "46000-46999", "sqlite-base": "47000-47999", "postgres-base": "48000-48999"}
GuardedRun = Callable[[argparse.Namespace, Workspace, Server, str, int], ControllerSample]


def start_servers(args: argparse.Namespace, workspace: Workspace, urls: list[str]) -> dict[str, Server]:
    """sqlite and postgres (this tree), and sqlite-base and postgres-base with --baseline-tree."""
    install_guest(workspace.images_dir)
    servers = {"sqlite": workspace.start_server()}
    servers["postgres"] = _server(workspace, "postgres", urls[0], Path(__file__).resolve().parents[2])
    if args.baseline_tree:
        tree = args.baseline_tree.resolve()
        if not (tree / "controller" / "cli.py").is_file():
            raise SystemExit(f"--baseline-tree {tree}: not a tofu-qemu checkout (no controller/cli.py)")
        servers["sqlite-base"] = _server(workspace, "sqlite-base", None, tree)
        servers["postgres-base"] = _server(workspace, "postgres-base", urls[1], tree)
    return servers


def _server(workspace: Workspace, mode: str, url: str | None, tree: Path) -> Server:
    store = ("--database-url", url) if url else ()
    return workspace.start_server(
        f"server-{mode}",
        data_dir=workspace.root / f"data-{mode}",
        tree=tree,
        extra_args=(
            *store,
            *("--images-dir", str(workspace.images_dir)),
            *("--port-range", PORT_RANGES[mode]),
        ),
    )


def samples_of(row: Row, mode: str) -> list[ControllerSample]:
    return {
        "sqlite": row.controller,
        "postgres": row.postgres,
        "sqlite-base": row.baseline,
        "postgres-base": row.postgres_baseline,
    }[mode]


def measure_postgres(
    args: argparse.Namespace,
    workspace: Workspace,
    rows: list[Row],
    urls: list[str],
    counts: Iterator[int],
    guarded_run: GuardedRun,
) -> None:
    """Every server runs each repeat, each going first in turn, timed as the controller is."""
    servers = start_servers(args, workspace, urls)
    modes = tuple(servers)
    for count in counts:
        row = Row(count)
        rows.append(row)
        for repeat in range(repeats_for(count, args.repeat)):
            for mode in mode_order(repeat, modes):
                server = servers[mode]
                wait_quiet(workspace.root, server.pid, max_wait=args.quiet_wait)
                project = f"converge-{mode}-n{count}-r{repeat}"
                sample = guarded_run(args, workspace, server, project, count)
                samples_of(row, mode).append(sample)
                progress(f"N={count} #{repeat + 1} {mode:<13} {sample.seconds:.3f} s")


def report_postgres(rows: list[Row], skipped: list[str], baseline: Path | None) -> None:
    print()
    print("Converge on PostgreSQL vs SQLite: state POST -> all N VMs Running (medians)")
    header = (
        f"{'N':>4} {'sqlite s':>9} {'postgres s':>11} {'ratio':>7} {'target':>7}  "
        f"{'cpu ms/VM sqlite':>16} {'postgres':>8}  {'foreign':>7}  result"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        samples = [*row.controller, *row.postgres, *row.baseline, *row.postgres_baseline]
        print(
            f"{row.count:>4} {row.controller_s:>9.3f} {row.postgres_s:>11.3f} {row.postgres_ratio:>7.2f} "
            f"{'<= ' + format(POSTGRES_TARGET_RATIO, '.2f'):>7}  "
            f"{row.cpu_ms_per_vm(row.controller):>16.1f} {row.cpu_ms_per_vm(row.postgres):>8.1f}  "
            f"{max(s.foreign_cores for s in samples):>6.2f}c  "
            f"{verdict(row.postgres_ratio <= POSTGRES_TARGET_RATIO)}"
        )
    if baseline is not None:
        _report_baseline(rows, baseline)
    print()
    print("foreign = most cores used by other processes (PostgreSQL's included) during any run of the row;")
    print("cpu ms/VM = the tofu-qemu server's on-CPU time per VM (PostgreSQL's own backends not included).")
    for line in skipped:
        print(f"skipped: {line}")


def _report_baseline(rows: list[Row], tree: Path) -> None:
    print()
    print(f"The same on the baseline (the code of {tree}), in the same repeats (medians)")
    header = (
        f"{'N':>4} {'sqlite s':>9} {'postgres s':>11} {'ratio':>7} {'this tree':>9}  "
        f"{'cpu ms/VM sqlite':>16} {'postgres':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        sqlite_s = statistics.median(s.seconds for s in row.baseline)
        postgres_s = statistics.median(s.seconds for s in row.postgres_baseline)
        print(
            f"{row.count:>4} {sqlite_s:>9.3f} {postgres_s:>11.3f} {postgres_s / sqlite_s:>7.2f} "
            f"{row.postgres_ratio:>9.2f}  {row.cpu_ms_per_vm(row.baseline):>16.1f} "
            f"{row.cpu_ms_per_vm(row.postgres_baseline):>8.1f}"
        )
