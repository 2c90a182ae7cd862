"""Host faults (--host-faults): break a whole host, freeze a controller, restart PostgreSQL, then
report duplicates across hosts, leaks on every host and in the store, and time to reschedule.

The faults run one after the other, each on a settled cluster (every VM Running):

  restart-postgres  stop PostgreSQL (fast), start it again. Figures: the store back (the api's
                    /readyz 200), every VM Running again, and how many VMs got a new QEMU (0
                    is the promise: a store outage restarts no VM).
  freeze            SIGSTOP the controller of the host with the most VMs for one lease plus the
                    host-lost grace plus 5 s, then SIGCONT. Figures: when its host went
                    NotReady, which of its VMs ran on another host meanwhile and when, and
                    every moment a VM had QEMUs alive on two hosts (the freeze window).
  kill-host         SIGKILL the controller of the host with the most VMs and every QEMU of its
                    data dir: the machine is gone. Figures: NotReady, and each of its VMs
                    Running on another host (time to reschedule), within --recover-timeout.
                    The host's controller is then started again, as a repaired machine.

Throughout, every host's data dir is scanned in /proc every 0.25 s: two hosts with a live QEMU of
one VM at once is a duplicate. At the end the tool publishes an empty state and looks for leaks:
any QEMU, runtime dir or disk dir left on any host, and any VM, port or disk row left in the store.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from _common import BenchError, server_layout
from _workspace import Workspace

from api.testing.tfstate import LINEAGE
from chaoslib.api import phase_of, pid_of
from chaoslib.audit import uid_dirs
from chaoslib.basics import EXIT_FAILED, EXIT_OK, PROC_SCAN_S, UNKNOWN_VM, ChaosError, note, rounded
from chaoslib.checks import Declared, chaos_spec, wait_until
from chaoslib.hostsetup import HOST_LEASE_S, HOST_LOST_GRACE_S, Cluster, Host, spawned_hosts
from chaoslib.processes import is_qemu_of, qemus_by_uid

HOST_FAULT_KINDS = ("restart-postgres", "freeze", "kill-host")
FREEZE_EXTRA_S = 5.0


@dataclass(slots=True)
class Overlap:
    """One VM with live QEMUs on two or more hosts, from the first scan that saw it to the last."""

    uid: str
    hosts: tuple[str, ...]
    first: float
    last: float
    during: str

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "hosts": list(self.hosts),
            "seen_for_s": rounded(self.last - self.first, 2),
            "during": self.during,
        }


@dataclass(slots=True)
class Scanner:
    """Scans every host's QEMUs every PROC_SCAN_S in a thread; records cross-host duplicates."""

    cluster: Cluster
    fault: str = "setup"
    overlaps: list[Overlap] = field(default_factory=list)
    _open: dict[str, Overlap] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def scan(self) -> dict[str, dict[str, list[int]]]:
        """uid -> host -> pids, for every live QEMU of every host."""
        found: dict[str, dict[str, list[int]]] = {}
        for host in self.cluster.hosts.values():
            for uid, pids in qemus_by_uid(host.data_dir).items():
                found.setdefault(uid, {})[host.name] = pids
        now = time.monotonic()
        for uid, by_host in found.items():
            if len(by_host) < 2 or uid == UNKNOWN_VM:
                continue
            overlap = self._open.get(uid)
            if overlap is None:
                overlap = self._open[uid] = Overlap(uid, tuple(sorted(by_host)), now, now, self.fault)
                self.overlaps.append(overlap)
                note(f"duplicate: VM {uid} has QEMUs on {', '.join(sorted(by_host))}")
            overlap.last = now
        for uid in [uid for uid in self._open if len(found.get(uid, {})) < 2]:
            del self._open[uid]
        return found

    @contextmanager
    def running(self) -> Iterator[None]:
        thread = threading.Thread(target=self._loop, name="host-scan", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(PROC_SCAN_S):
            self.scan()


Placements = dict[str, tuple[str | None, int | None, str]]


def placements(cluster: Cluster, project: str) -> Placements:
    """uid -> (host, pid, phase) as the API says."""
    return {
        vm["metadata"]["uid"]: (vm.get("status", {}).get("host"), pid_of(vm), phase_of(vm))
        for vm in cluster.api.vms(project)
    }


def runs_on(cluster: Cluster, uid: str, host: str | None, pid: int | None) -> bool:
    """Whether `pid` is a live QEMU of VM `uid` in `host`'s data dir: a status the API shows may
    be stale (a host whose controller died never updates it)."""
    if host not in cluster.hosts or not pid:
        return False
    return is_qemu_of(pid, uid, server_layout(cluster.hosts[host].data_dir).run_root)


def all_running(cluster: Cluster, project: str, count: int) -> bool:
    """Every VM Running, on its host, with the live QEMU its status names."""
    try:
        seen = placements(cluster, project)
    except (OSError, ChaosError):
        return False
    return len(seen) == count and all(
        phase == "Running" and runs_on(cluster, uid, host, pid) for uid, (host, pid, phase) in seen.items()
    )


def busiest(cluster: Cluster, project: str) -> Host:
    counts = {name: 0 for name, host in cluster.hosts.items() if host.pid is not None}
    for host, _, _ in placements(cluster, project).values():
        if host in counts:
            counts[host] += 1
    return cluster.hosts[max(counts, key=lambda name: (counts[name], name))]


def seconds_until(check: Any, *, timeout: float, every: float = 0.1) -> float | None:
    """Seconds until `check()` is true, or None when it was not within `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(every)
    return None


def restart_postgres(cluster: Cluster, project: str, count: int, args: argparse.Namespace) -> dict[str, Any]:
    before = placements(cluster, project)
    started = time.monotonic()
    cluster.postgres.stop()
    cluster.postgres.start()
    restart_s = time.monotonic() - started
    store_back = seconds_until(cluster.api_ready, timeout=args.recover_timeout)
    running = seconds_until(lambda: all_running(cluster, project, count), timeout=args.recover_timeout)
    restarted = new_qemus(before, placements(cluster, project))
    return {
        "kind": "restart-postgres",
        "restart_s": rounded(restart_s, 2),
        "store_back_s": rounded(store_back, 2),
        "all_running_s": rounded(running, 2),
        "vms_restarted": restarted,
        "passed": running is not None and not restarted,
    }


def new_qemus(before: Placements, after: Placements) -> list[str]:
    """The VMs whose QEMU (pid) is not the one they had before."""
    return sorted(uid for uid, (_, pid, _) in before.items() if uid not in after or after[uid][1] != pid)


def moved_off(cluster: Cluster, project: str, victim: str, uids: set[str]) -> dict[str, str]:
    """The VMs of `uids` Running on another host than `victim`: uid -> host."""
    try:
        seen = placements(cluster, project)
    except (OSError, ChaosError):
        return {}
    return {
        uid: host
        for uid, (host, pid, phase) in seen.items()
        if host is not None
        and uid in uids
        and host != victim
        and phase == "Running"
        and runs_on(cluster, uid, host, pid)
    }


def watch_moves(
    cluster: Cluster, project: str, victim: Host, uids: set[str], *, timeout: float, started: float
) -> tuple[float | None, dict[str, float]]:
    """Poll until `victim` is NotReady and every VM of `uids` runs elsewhere, or `timeout`.
    Returns (NotReady after s, uid -> rescheduled after s)."""
    not_ready: float | None = None
    moved: dict[str, float] = {}
    while time.monotonic() - started < timeout and (not_ready is None or len(moved) < len(uids)):
        now = time.monotonic() - started
        row = cluster.host_rows().get(victim.name)
        if not_ready is None and row is not None and not row["ready"]:
            not_ready = now
        for uid in moved_off(cluster, project, victim.name, uids):
            moved.setdefault(uid, now)
        time.sleep(0.2)
    return not_ready, moved


def freeze(cluster: Cluster, project: str, count: int, args: argparse.Namespace) -> dict[str, Any]:
    victim = busiest(cluster, project)
    before = placements(cluster, project)
    uids = {uid for uid, (host, _, _) in before.items() if host == victim.name}
    assert victim.pid is not None
    hold = HOST_LEASE_S + HOST_LOST_GRACE_S + FREEZE_EXTRA_S
    note(f"freeze: SIGSTOP the controller of {victim.name} ({len(uids)} VMs) for {hold:.0f} s")
    started = time.monotonic()
    os.kill(victim.pid, signal.SIGSTOP)
    victim.frozen = True
    try:
        not_ready, moved = watch_moves(cluster, project, victim, uids, timeout=hold, started=started)
        time.sleep(max(0.0, hold - (time.monotonic() - started)))
    finally:
        os.kill(victim.pid, signal.SIGCONT)
        victim.frozen = False
    ready_again = seconds_until(
        lambda: bool(cluster.host_rows().get(victim.name, {}).get("ready")), timeout=args.recover_timeout
    )
    running = seconds_until(lambda: all_running(cluster, project, count), timeout=args.recover_timeout)
    return {
        "kind": "freeze",
        "vms_restarted": new_qemus(before, placements(cluster, project)),
        "host": victim.name,
        "vms": len(uids),
        "frozen_s": rounded(hold, 1),
        "not_ready_after_s": rounded(not_ready, 2),
        "rescheduled": {uid: rounded(after, 2) for uid, after in moved.items()},
        "ready_after_sigcont_s": rounded(ready_again, 2),
        "all_running_after_sigcont_s": rounded(running, 2),
        "passed": running is not None and not_ready is not None,
    }


def kill_host(cluster: Cluster, project: str, count: int, args: argparse.Namespace) -> dict[str, Any]:
    victim = busiest(cluster, project)
    uids = {uid for uid, (host, _, _) in placements(cluster, project).items() if host == victim.name}
    note(f"kill-host: SIGKILL the controller of {victim.name} and its {len(uids)} QEMUs")
    started = time.monotonic()
    victim.controller.kill()
    for pids in qemus_by_uid(victim.data_dir).values():
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    not_ready, moved = watch_moves(
        cluster, project, victim, uids, timeout=args.recover_timeout, started=started
    )
    times = sorted(moved.values())
    victim.controller.restart()
    running = seconds_until(lambda: all_running(cluster, project, count), timeout=args.recover_timeout)
    return {
        "kind": "kill-host",
        "host": victim.name,
        "vms": len(uids),
        "not_ready_after_s": rounded(not_ready, 2),
        "rescheduled": f"{len(moved)} of {len(uids)} within {args.recover_timeout:g} s",
        "reschedule_s": {
            "p50": rounded(statistics.median(times), 2) if times else None,
            "max": rounded(max(times), 2) if times else None,
        },
        "all_running_after_restart_s": rounded(running, 2),
        "passed": running is not None and not_ready is not None,
    }


FAULTS = {"restart-postgres": restart_postgres, "freeze": freeze, "kill-host": kill_host}


def leaks(cluster: Cluster) -> dict[str, Any]:
    """After the delete: whatever any host or the store still holds."""
    found: dict[str, Any] = {}
    for host in cluster.hosts.values():
        layout = server_layout(host.data_dir)
        qemus = qemus_by_uid(host.data_dir)
        left = {
            "qemus": sum(len(pids) for pids in qemus.values()),
            "runtime_dirs": len(uid_dirs(layout.run_root, set())),
            "disk_dirs": len(uid_dirs(layout.disks_root, set())),
        }
        found[host.name] = left
    with psycopg.connect(cluster.url) as connection:
        for table in ("vms", "port_allocations", "disks"):
            row = connection.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 (fixed names)
            found[f"{table}_rows"] = int(row[0]) if row else 0
    found["total"] = sum(
        value if isinstance(value, int) else sum(value.values()) for key, value in found.items()
    )
    return found


def run_host_chaos(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    project, count = args.project, args.vms
    declared = Declared(serial=0, lineage=LINEAGE)
    names = [f"chaos-{index}" for index in range(count)]
    scanner = Scanner(cluster)
    results: list[dict[str, Any]] = []
    with scanner.running():
        cluster.api.post_state(project, declared.body(dict.fromkeys(names, chaos_spec(args.memory))))
        try:
            took = wait_until(
                lambda: all_running(cluster, project, count), timeout=120 + 10 * count, what="VMs Running"
            )
        except ChaosError as err:
            seen = placements(cluster, project)
            raise ChaosError(f"{err}; the API says (host, pid, phase) {seen}") from None
        spread = _spread(placements(cluster, project))
        note(f"{count} VMs Running after {took:.1f} s, by host: {spread}")
        for kind in args.host_faults:
            scanner.fault = kind
            result = FAULTS[kind](cluster, project, count, args)
            note(f"{kind}: {result}")
            results.append(result)
        scanner.fault = "delete"
        cluster.api.post_state(project, declared.body({}))
        gone = seconds_until(lambda: not placements(cluster, project), timeout=args.recover_timeout)
        clean = seconds_until(lambda: leaks(cluster)["total"] == 0, timeout=args.leak_grace)
    left = leaks(cluster)
    duplicates = [overlap.to_json() for overlap in scanner.overlaps]
    passed = (
        all(result["passed"] for result in results)
        and gone is not None
        and left["total"] == 0
        and not [d for d in duplicates if d["during"] != "freeze"]
    )
    return {
        "host_faults": results,
        "spread": spread,
        "duplicates": duplicates,
        "leaks_after_delete": left,
        "clean_after_s": rounded(clean, 2),
        "summary": {"passed": passed, "duplicates": len(duplicates), "leaks": left["total"]},
    }


def _spread(seen: Mapping[str, tuple[str | None, int | None, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for host, _, _ in seen.values():
        counts[str(host)] = counts.get(str(host), 0) + 1
    return dict(sorted(counts.items()))


def run_host_faults(args: argparse.Namespace, document: dict[str, Any]) -> int:
    """The --host-faults run: spawn, break, check, report. Returns the exit status."""
    started = time.monotonic()
    try:
        with Workspace("chaos-hosts", keep=args.keep) as workspace:
            document["workspace"] = str(workspace.root)
            with spawned_hosts(args, workspace) as cluster:
                document |= run_host_chaos(cluster, args)
            if not document["summary"]["passed"]:
                workspace.keep = True
                note(f"keeping {workspace.root} for its logs (every QEMU is killed)")
    except (ChaosError, BenchError, OSError) as err:
        note(f"failed: {err}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        note("interrupted; everything the tool started was stopped")
        return 130
    document["wall_seconds"] = rounded(time.monotonic() - started, 1)
    lines = host_summary(document)
    print("\n".join(lines), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        text = json.dumps(document, indent=2, sort_keys=True)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    return EXIT_OK if document["summary"]["passed"] else EXIT_FAILED


def host_summary(document: Mapping[str, Any]) -> list[str]:
    lines = [f"Host chaos: {document['settings']['vms']} VMs on {document['settings']['hosts']} hosts"]
    lines.append(f"spread: {document['spread']}")
    for result in document["host_faults"]:
        figures = ", ".join(f"{k} {v}" for k, v in result.items() if k not in ("kind", "passed"))
        lines.append(f"{result['kind']}: {'ok' if result['passed'] else 'FAILED'}: {figures}")
    lines.append(f"duplicates across hosts: {len(document['duplicates'])} {document['duplicates'] or ''}")
    lines.append(f"leaks after delete: {document['leaks_after_delete']}")
    lines.append(f"verdict: {'PASS' if document['summary']['passed'] else 'FAIL'}")
    return lines
