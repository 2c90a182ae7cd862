"""Setting up, checking and tearing down a run: declare the VMs, break them, settle, check, delete."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from _common import guest_spec

from api.store.db import DB_FILE_NAME
from api.testing import waiting
from api.testing.tfstate import LINEAGE, encode, vm_state
from chaoslib.api import Api, phase_of, pid_of, restarts_of
from chaoslib.audit import Audit, audit, integrity_check
from chaoslib.basics import AUDIT_EVERY_S, POLL_S, ChaosError, UsageError, md5_hex, note
from chaoslib.faults import Chaos, Target
from chaoslib.processes import runtime_problem
from chaoslib.report import report


def chaos_spec(memory_mib: int) -> dict[str, Any]:
    """The benchmarks' tiny guest, plus one forward and one blank disk to hold a port and a disk."""
    return guest_spec(memory_mib=memory_mib) | {
        "network": {"forwards": [{"guestPort": 80}]},
        "disks": [{"name": "scratch", "size": 8}],
    }


@dataclass(slots=True)
class Declared:
    """The states the tool published, to check the store against."""

    serial: int
    lineage: str
    last_body: bytes = b""
    generations: dict[str, int] = field(default_factory=dict)  # name -> generation at the start

    def body(self, vms: Mapping[str, Mapping[str, Any]]) -> bytes:
        self.serial += 1
        self.last_body = encode(
            vm_state(self.serial, {name: dict(spec) for name, spec in vms.items()}, lineage=self.lineage)
        )
        return self.last_body


def claim_project(api: Api, project: str) -> Declared:
    """The project must hold no resources: the tool creates and deletes its VMs itself.

    :raise UsageError: the project is in use.
    """
    current = api.state(project)
    if current is None:
        return Declared(serial=0, lineage=LINEAGE)
    document = json.loads(current)
    if document.get("resources"):
        raise UsageError(f"project {project!r} already has resources in its state; choose another --project")
    return Declared(serial=int(document.get("serial", 0)), lineage=str(document.get("lineage") or LINEAGE))


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, every: float = POLL_S) -> float:
    """Poll `check` until true (api.testing.waiting). Returns seconds taken. :raise ChaosError: timeout."""
    started = time.monotonic()
    try:
        waiting.wait_until(check, timeout=timeout, what=what, interval=every)
    except waiting.WaitTimeout as err:
        raise ChaosError(f"timed out waiting for {err}") from None
    return time.monotonic() - started


def declare_vms(target: Target, declared: Declared, args: argparse.Namespace) -> dict[str, str]:
    """POST a state with the VMs and wait until all run. Returns name -> uid."""
    names = [f"chaos-{index}" for index in range(args.vms)]
    target.api.post_state(target.project, declared.body(dict.fromkeys(names, chaos_spec(args.memory))))
    objects: dict[str, dict[str, Any]] = {}

    def all_running() -> bool:
        objects.clear()
        objects.update({vm["metadata"]["name"]: vm for vm in target.api.vms(target.project)})
        return set(objects) == set(names) and all(
            phase_of(vm) == "Running"
            and (pid := pid_of(vm)) is not None
            and runtime_problem(target.runtime(vm["metadata"]["uid"]), pid) is None
            for vm in objects.values()
        )

    took = wait_until(all_running, timeout=60 + 5 * args.vms, what=f"{args.vms} VMs Running")
    note(f"{args.vms} VMs Running after {took:.1f} s")
    declared.generations = {name: int(vm["metadata"]["generation"]) for name, vm in objects.items()}
    return {name: vm["metadata"]["uid"] for name, vm in objects.items()}


def audit_until_clean(chaos: Chaos, *, grace: float) -> tuple[Audit, float]:
    """Audit every AUDIT_EVERY_S until no leak remains, at most `grace` s. Returns the last audit
    and the seconds it took to be clean (NaN if it never was)."""
    started = time.monotonic()
    while True:
        result = audit(chaos.target.data_dir)
        chaos.scan(result.qemus)
        if result.leaks == 0:
            return result, time.monotonic() - started
        if time.monotonic() - started > grace:
            return result, math.nan
        time.sleep(AUDIT_EVERY_S)


def check_store(target: Target, declared: Declared, uids: Mapping[str, str] | None) -> dict[str, Any]:
    """Integrity, the state's md5, and (with `uids`) the objects: exactly the declared VMs, same
    uids and generations as at the start."""
    problems: list[str] = []
    integrity = integrity_check(target.data_dir / DB_FILE_NAME)
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    body = target.api.state(target.project) or b""
    state_md5_ok = md5_hex(body) == md5_hex(declared.last_body)
    if not state_md5_ok:
        problems.append(f"GET /state md5 {md5_hex(body)} != posted {md5_hex(declared.last_body)}")
    objects = {vm["metadata"]["name"]: vm for vm in target.api.vms(target.project)}
    expected = dict(uids or {})
    if set(objects) != set(expected):
        problems.append(f"objects {sorted(objects)} != declared {sorted(expected)}")
    for name, vm in sorted(objects.items()):
        if name in expected and vm["metadata"]["uid"] != expected[name]:
            problems.append(f"{name}: uid {vm['metadata']['uid']} != {expected[name]} at the start")
        if name in declared.generations and vm["metadata"]["generation"] != declared.generations[name]:
            problems.append(
                f"{name}: generation {vm['metadata']['generation']} != {declared.generations[name]}"
            )
    return {
        "integrity": integrity,
        "state_md5_ok": state_md5_ok,
        "intact": not problems,
        "problems": problems,
    }


def vms_not_running(chaos: Chaos) -> list[dict[str, Any]]:
    chaos.tick()
    result = []
    for name, uid in sorted(chaos.uids.items()):
        pid, why = chaos.health(uid)
        if pid is None:
            vm = chaos.objects.get(uid)
            result.append({"vm": name, "uid": uid, "pid": pid_of(vm) if vm else None, "why": why})
    return result


def restart_counts(chaos: Chaos) -> list[dict[str, Any]]:
    """VMs whose status.restarts moved by other than the number of their QEMUs the tool saw
    replaced (recovered faults with a new pid). Status should carry the truth; checked only
    when every fault was recovered, since a failed start counts as a restart too."""
    if any(fault.recovered_at is None for fault in chaos.faults):
        return []
    off = []
    for name, uid in sorted(chaos.uids.items()):
        replaced = sum(1 for f in chaos.faults if f.uid == uid and f.new_pid not in (None, f.pid))
        vm = chaos.objects.get(uid)
        counted = restarts_of(vm) - chaos.restarts_at_start.get(uid, 0) if vm else None
        if counted != replaced:
            off.append({"vm": name, "uid": uid, "replaced": replaced, "restarts_counted": counted})
    return off


def delete_all(chaos: Chaos, declared: Declared, *, timeout: float) -> float:
    """Publish an empty state and wait until the project lists no VM. Returns the seconds it
    took, NaN if some were still listed after `timeout` (the leak check then shows what is left)."""
    target = chaos.target
    target.api.post_state(target.project, declared.body({}))

    def gone() -> bool:
        chaos.scan()
        return not target.api.vms(target.project)

    try:
        return wait_until(gone, timeout=timeout, what="the VMs to be deleted", every=0.1)
    except ChaosError as err:
        note(str(err))
        return math.nan


def run_chaos(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Declare, break, settle, check, delete, check. Returns the report.

    Whatever happens, the project is left with an empty state (best effort), so a failed run on
    a user's host does not leave its VMs behind.
    """
    declared = claim_project(target.api, target.project)
    try:
        return _break_and_check(target, declared, args)
    finally:
        if declared.last_body and json.loads(declared.last_body)["resources"]:
            with contextlib.suppress(OSError, ChaosError):
                target.api.post_state(target.project, declared.body({}))


def _break_and_check(target: Target, declared: Declared, args: argparse.Namespace) -> dict[str, Any]:
    uids = declare_vms(target, declared, args)
    chaos = Chaos(target, uids=uids, args=args)
    try:
        note(
            f"chaos for {args.duration:g} s: {','.join(args.faults)} every {args.interval:g} s, "
            f"{args.controller_kills} controller kill(s), seed {args.seed}"
        )
        chaos.run()
        settle_s = chaos.settle(timeout=args.recover_timeout)
        note(f"settled {settle_s:.1f} s after the run")
    finally:
        continued = chaos.continue_stopped()
        if continued:
            note(f"sent SIGCONT to QEMUs still stopped: {continued}")
    not_running = vms_not_running(chaos)
    restarts_off = restart_counts(chaos)
    after_run, clean_after_run_s = audit_until_clean(chaos, grace=args.leak_grace)
    store_after_run = check_store(target, declared, uids)
    delete_s = delete_all(chaos, declared, timeout=args.recover_timeout)
    if not math.isnan(delete_s):
        note(f"all VMs deleted in {delete_s:.1f} s")
    after_delete, clean_after_delete_s = audit_until_clean(chaos, grace=args.leak_grace)
    store_after_delete = check_store(target, declared, None)
    chaos.finish()
    return report(
        chaos,
        not_running=not_running,
        audits={"after_run": after_run, "after_delete": after_delete},
        clean_s={"after_run": clean_after_run_s, "after_delete": clean_after_delete_s},
        stores={"after_run": store_after_run, "after_delete": store_after_delete},
        continued=continued,
        settle_s=settle_s,
        delete_s=delete_s,
        restarts_off=restarts_off,
    )
