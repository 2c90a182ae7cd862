"""The report: fault figures, the JSON document, and the summary printed for people."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from chaoslib.audit import Audit
from chaoslib.basics import note, rounded, stats
from chaoslib.faults import Chaos
from chaoslib.records import Fault, overlapping


def fault_figures(faults: Sequence[Fault]) -> dict[str, Any]:
    """Counts and MTTR. `mttr_direct_s` keeps only recoveries that nothing but the controller's
    own reaction delayed: no crash-loop backoff (a VM failing again within 60 s of its start
    waits 1 s, 2 s, 4 s ...) and no controller outage."""
    recovered = [fault for fault in faults if fault.mttr_s is not None]
    direct = [fault for fault in recovered if fault.backoff_s == 0 and not fault.controller_outage]
    return {
        "kills": len(faults),
        "recovered": len(recovered),
        "unrecovered": len(faults) - len(recovered),
        "mttr_s": stats([fault.mttr_s for fault in recovered if fault.mttr_s is not None]),
        "direct": len(direct),
        "mttr_direct_s": stats([fault.mttr_s for fault in direct if fault.mttr_s is not None]),
    }


def report(
    chaos: Chaos,
    *,
    not_running: list[dict[str, Any]],
    audits: Mapping[str, Audit],
    clean_s: Mapping[str, float],
    stores: Mapping[str, dict[str, Any]],
    continued: list[int],
    settle_s: float,
    delete_s: float,
    restarts_off: list[dict[str, Any]],
) -> dict[str, Any]:
    faults = chaos.faults
    by_kind = {kind: fault_figures([f for f in faults if f.kind == kind]) for kind in chaos.args.faults}
    duplicates = overlapping(chaos.lifetimes)
    leaks = sum(audit_.leaks for audit_ in audits.values())
    kills = chaos.controller_kills
    summary = {
        **fault_figures(faults),
        "skipped": chaos.skipped,
        "controller_kills": len(kills),
        "controller_restarts": sum(1 for kill in kills if kill.new_pid is not None),
        "controller_down_s": stats([k.started_logged_at - k.at for k in kills if k.started_logged_at]),
        "vms_not_running": len(not_running),
        "duplicates": len(duplicates),
        "leaks": leaks,
        "store_intact": all(store["intact"] for store in stores.values()),
        "deleted": not math.isnan(delete_s),
        # Reported, not judged: a miscount is wrong status, not a broken VM.
        "restart_counts_off": len(restarts_off),
    }
    summary["passed"] = (
        summary["kills"] > 0
        and summary["unrecovered"] == 0
        and summary["vms_not_running"] == 0
        and summary["duplicates"] == 0
        and summary["leaks"] == 0
        and summary["store_intact"]
        and summary["deleted"]
        and summary["controller_kills"] == summary["controller_restarts"] == chaos.args.controller_kills
    )
    return {
        "tool": "hack/chaos",
        "summary": summary,
        "by_kind": by_kind,
        "settle_s": rounded(settle_s),
        "delete_s": rounded(delete_s),
        "poll_errors": chaos.poll_errors,
        "vms_not_running": not_running,
        "restart_counts_off": restarts_off,
        "duplicates": duplicates,
        "checks": {
            name: audit_.to_json() | {"clean_after_s": rounded(clean_s[name])}
            for name, audit_ in audits.items()
        },
        "store": dict(stores),
        "sigcont_sent_to": continued,
        "faults": [fault.to_json() for fault in faults],
        "controller_kill_events": [kill.to_json() for kill in kills],
    }


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def print_summary(document: Mapping[str, Any], out: TextIO) -> None:
    s = document["summary"]
    lines = fault_table(document)
    if s["skipped"]:
        lines.append(f"faults skipped (no Running VM free): {s['skipped']}")
    down = s["controller_down_s"]
    lines.append(
        f"controller kills: {s['controller_kills']}, restarted {s['controller_restarts']}"
        + (
            f"; kill -> workers running again p50 {seconds(down['p50'])}, max {seconds(down['max'])}"
            if down["max"]
            else ""
        )
    )
    lines.append(f"VMs not Running at the end: {s['vms_not_running']}")
    lines += [f"  {vm['vm']}: {vm['why']}"[:300] for vm in document["vms_not_running"]]
    lines.append(f"duplicate QEMUs: {s['duplicates']}")
    if s["restart_counts_off"]:
        lines.append(
            f"warning: status.restarts does not match the QEMUs replaced for {s['restart_counts_off']} VM(s)"
        )
        lines += [
            f"  {vm['vm']}: {vm['replaced']} replaced, restarts moved by {vm['restarts_counted']}"
            for vm in document["restart_counts_off"]
        ]
    lines += [
        f"  VM {duplicate['uid']}: pids {duplicate['pids']} "
        f"alive together for {seconds(duplicate['overlap_s'])}"
        for duplicate in document["duplicates"]
    ]
    lines += check_lines(document)
    lines.append(f"verdict: {'PASS' if s['passed'] else 'FAIL'}")
    print("\n".join(lines), file=out)


def fault_table(document: Mapping[str, Any]) -> list[str]:
    """The run's settings, then injected, recovered and MTTR by kind of fault (and all together)."""
    settings = document["settings"]

    def row(label: str, figures: Mapping[str, Any]) -> str:
        mttr, direct = figures["mttr_s"], figures["mttr_direct_s"]
        return (
            f"{label:8} {figures['kills']:>8} {figures['recovered']:>9} {figures['unrecovered']:>11}  "
            + " ".join(f"{seconds(mttr[key]):>8}" for key in ("p50", "p95", "max"))
            + f"  {figures['direct']:>6} {seconds(direct['p50']):>8} {seconds(direct['max']):>8}"
        )

    header = (
        f"{'fault':8} {'injected':>8} {'recovered':>9} {'unrecovered':>11}  "
        f"{'MTTR p50':>8} {'p95':>8} {'max':>8}  {'direct':>6} {'p50':>8} {'max':>8}"
    )
    lines = [
        "",
        f"Chaos: {settings['vms']} VMs, {settings['duration']:g} s, a fault every {settings['interval']:g} s "
        f"({','.join(settings['faults'])}), {settings['controller_kills']} controller kill(s), "
        f"seed {settings['seed']}",
        header,
        "-" * len(header),
    ]
    lines += [row(kind, figures) for kind, figures in document["by_kind"].items()]
    if len(document["by_kind"]) > 1:
        lines.append(row("all", document["summary"]))
    lines.append("(direct: recoveries delayed neither by the crash-loop backoff nor by a controller outage)")
    return lines


def check_lines(document: Mapping[str, Any]) -> list[str]:
    """The leak counts and the store's state, after the run and after the delete."""
    kinds = ("qemus_without_vm", "qemus_unmanaged", "port_rows_without_vm", "disk_rows_without_vm",
             "disk_files_without_vm", "runtime_dirs_without_vm")  # fmt: skip
    lines = []
    for name, check in document["checks"].items():
        counts = ", ".join(
            f"{kind.replace('_without_vm', '').replace('_', ' ')} {len(check[kind])}" for kind in kinds
        )
        lines.append(f"leaks {name.replace('_', ' ')}: {check['leaks']} ({counts})")
    for name, store in document["store"].items():
        verdict = "intact" if store["intact"] else "DAMAGED: " + "; ".join(store["problems"])
        lines.append(f"store {name.replace('_', ' ')}: integrity {store['integrity']}, {verdict}")
    return lines


def emit(document: Mapping[str, Any], args: argparse.Namespace) -> None:
    text = json.dumps(document, indent=2, default=str) + "\n"
    if args.json == "-":
        sys.stdout.write(text)
    elif args.json:
        Path(args.json).write_text(text)
        note(f"wrote {args.json}")
    print_summary(document, sys.stderr if args.json == "-" else sys.stdout)
