"""The chaos run itself: the fault schedule, the watch over every fault until it settles, and
duplicate sightings."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import server_layout
from _server import ServerLog

from chaoslib.api import Api, phase_of, pid_of, ready_message, restarts_of
from chaoslib.basics import (
    CONTROLLER_DOWN_MIN_S,
    KILL_AFTER_FAULT_S,
    POLL_S,
    PROC_SCAN_S,
    UNKNOWN_VM,
    ChaosError,
    epoch_now,
    note,
)
from chaoslib.processes import Controller, is_qemu_of, qemus_by_uid, runtime_problem
from chaoslib.records import ControllerKill, Fault, Lifetime
from controller.qemu.argv import RuntimePaths
from controller.qemu.process import read_stat


@dataclass(frozen=True, slots=True)
class Target:
    """Where the VMs live and how the tool reaches them."""

    api: Api
    project: str
    data_dir: Path
    controller: Controller | None
    controller_log: Path | None

    @property
    def run_root(self) -> Path:
        return server_layout(self.data_dir).run_root

    def runtime(self, uid: str) -> RuntimePaths:
        return server_layout(self.data_dir).runtime(uid)


class Chaos:
    """The fault schedule, the watch over every fault until it settles, and duplicate sightings.

    One thread: each tick polls the API, settles faults, scans /proc now and then, and fires
    whatever is due (a fault, a controller kill, a controller restart).
    """

    def __init__(self, target: Target, *, uids: Mapping[str, str], args: argparse.Namespace) -> None:
        self.target = target
        self.uids = dict(uids)  # name -> uid
        self.args = args
        self.rng = random.Random(args.seed)
        self.faults: list[Fault] = []
        self.controller_kills: list[ControllerKill] = []
        self.skipped = 0
        self.poll_errors = 0
        self.objects: dict[str, dict[str, Any]] = {}  # uid -> the VM object last polled
        self.lifetimes: dict[str, dict[int, Lifetime]] = {}  # uid -> pid -> when it was seen alive
        self._restart_due: float | None = None
        self._last_scan = 0.0
        self._noted: set[tuple[str | int, ...]] = set()
        self.restarts_at_start: dict[str, int] = {}  # uid -> status.restarts before the first fault

    # ---- observing

    def tick(self) -> None:
        self._poll()
        self._settle_faults()
        if time.monotonic() - self._last_scan >= PROC_SCAN_S:
            self.scan()
        self._restart_controller_if_due()

    def _poll(self) -> None:
        try:
            items = self.target.api.vms(self.target.project)
        except (OSError, ChaosError, ValueError):
            self.poll_errors += 1
            return
        self.objects = {item["metadata"]["uid"]: item for item in items}

    def scan(self, qemus: Mapping[str, list[int]] | None = None) -> None:
        """Note every live QEMU of the data dir in its lifetime (duplicates are found from them)."""
        self._last_scan = time.monotonic()
        at = epoch_now()
        for uid, pids in (qemus if qemus is not None else qemus_by_uid(self.target.data_dir)).items():
            for pid in pids:
                self.lifetimes.setdefault(uid, {}).setdefault(pid, Lifetime()).see(at)
            if len(pids) > 1 and uid != UNKNOWN_VM and (uid, *pids) not in self._noted:
                self._noted.add((uid, *pids))
                note(f"duplicate QEMUs for VM {uid}: pids {pids}")

    def health(self, uid: str) -> tuple[int | None, str]:
        """(pid, "") if the VM is Running with a live QEMU of its own that its runtime dir
        proves; else (None, what is wrong)."""
        vm = self.objects.get(uid)
        if vm is None:
            return None, "no object"
        pid = pid_of(vm)
        if phase_of(vm) != "Running" or pid is None:
            return None, " ".join(f"{phase_of(vm)}: {ready_message(vm)}".split())
        if not is_qemu_of(pid, uid, self.target.run_root):
            return None, f"Running, but pid {pid} is no live QEMU of this VM"
        problem = runtime_problem(self.target.runtime(uid), pid)
        if problem is not None:
            return None, f"Running as pid {pid}, but its runtime dir has {problem}"
        return pid, ""

    def is_running(self, uid: str) -> int | None:
        return self.health(uid)[0]

    def _settle_faults(self) -> None:
        now = epoch_now()
        for fault in self.faults:
            if fault.settled:
                continue
            pid = self.is_running(fault.uid)
            if pid is not None and (fault.kind in ("rmdir", "rmsock") or pid != fault.pid):
                fault.recovered_at, fault.new_pid, fault.timing, fault.settled = now, pid, "poll", True
                fault.failures = int(self.objects[fault.uid]["status"].get("failures", 0))
            elif now - fault.at > self.args.recover_timeout:
                fault.settled = True
                note(f"{fault.kind} of {fault.vm} (pid {fault.pid}) not recovered in time")

    @property
    def pending(self) -> set[str]:
        return {fault.uid for fault in self.faults if not fault.settled}

    # ---- acting

    def inject(self) -> None:
        """One fault into a random Running VM with none pending."""
        kind = self.rng.choice(self.args.faults)
        candidates = [
            (name, uid, pid)
            for name, uid in sorted(self.uids.items())
            if uid not in self.pending and (pid := self.is_running(uid)) is not None
        ]
        if not candidates:
            self.skipped += 1
            note(f"no Running VM free for a fault ({kind}); skipped")
            return
        name, uid, pid = self.rng.choice(candidates)
        runtime = self.target.runtime(uid)
        fault = Fault(kind, name, uid, pid, epoch_now(), controller_outage=not self._controller_up)
        match kind:
            case "kill":
                os.kill(pid, signal.SIGKILL)
            case "stop":
                os.kill(pid, signal.SIGSTOP)
            case "rmdir":
                shutil.rmtree(runtime.directory, ignore_errors=True)
            case "rmsock":
                Path(runtime.qmp_socket).unlink(missing_ok=True)
            case _:
                raise AssertionError(kind)
        self.faults.append(fault)
        note(
            f"{kind} {name} (pid {pid})"
            + (" while the controller is down" if fault.controller_outage else "")
        )

    @property
    def _controller_up(self) -> bool:
        return self.target.controller is None or self.target.controller.is_up

    def kill_controller(self) -> bool:
        """SIGKILL the controller if it is up; False if it is down (the caller tries later)."""
        controller = self.target.controller
        if controller is None or not controller.is_up:
            return False
        at = epoch_now()
        pid = controller.kill()
        if controller.launch is None:
            delay = 0.0  # its supervisor decides when; look for the new one at once
            note(f"controller pid {pid} killed; waiting for its supervisor to start it again")
        else:
            delay = self.rng.uniform(
                CONTROLLER_DOWN_MIN_S, max(CONTROLLER_DOWN_MIN_S, self.args.controller_down)
            )
            note(f"controller pid {pid} killed; restart in {delay:.1f} s")
        self.controller_kills.append(ControllerKill(pid, at))
        self._restart_due = at + delay
        return True

    def _restart_controller_if_due(self) -> None:
        controller = self.target.controller
        if controller is None or self._restart_due is None or epoch_now() < self._restart_due:
            return
        new_pid = controller.restart()
        if new_pid is None:
            return  # a supervisor's restart: look again at the next tick
        self._restart_due = None
        kill = self.controller_kills[-1]
        kill.restarted_at, kill.new_pid = epoch_now(), new_pid
        note(f"controller restarted: pid {new_pid}")

    # ---- the schedule

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds from the start, "fault" | "controller-kill"), in order."""
        count = int(self.args.duration / self.args.interval)
        events = [((index + 0.5) * self.args.interval, "fault") for index in range(count)]
        slices = self.args.controller_kills
        for index in range(slices):
            low, high = index * self.args.duration / slices, (index + 1) * self.args.duration / slices
            inside = [at for at, _ in events if low <= at < high and at + KILL_AFTER_FAULT_S < high]
            if inside:
                at = self.rng.choice(inside) + self.rng.uniform(0.0, KILL_AFTER_FAULT_S)
            else:
                at = self.rng.uniform(low, high)
            events.append((at, "controller-kill"))
        return sorted(events)

    def run(self) -> None:
        events = self.schedule()
        self.tick()
        self.restarts_at_start = {uid: restarts_of(vm) for uid, vm in self.objects.items()}
        started = time.monotonic()
        postponed_kills = 0
        while True:
            self.tick()
            elapsed = time.monotonic() - started
            while events and events[0][0] <= elapsed:
                _, what = events.pop(0)
                if what == "fault":
                    self.inject()
                elif not self.kill_controller():
                    postponed_kills += 1
            if postponed_kills and self.kill_controller():
                postponed_kills -= 1
            if elapsed >= self.args.duration and not events:
                break
            time.sleep(POLL_S)
        if postponed_kills:
            note(f"{postponed_kills} controller kill(s) not done: the controller was never up again in time")

    def settle(self, *, timeout: float) -> float:
        """After the run: wait until every fault is settled, the controller is up and every VM
        runs (at most `timeout` s beyond the faults' own deadlines). Returns the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            self.tick()
            everything_runs = self._controller_up and all(
                self.is_running(uid) is not None for uid in self.uids.values()
            )
            if not self.pending and (everything_runs or time.monotonic() > deadline):
                return time.monotonic() - started
            time.sleep(POLL_S)

    def continue_stopped(self) -> list[int]:
        """SIGCONT every QEMU the tool stopped that is still stopped (an unrecovered `stop`)."""
        continued = []
        for fault in self.faults:
            stat = read_stat(fault.pid)
            is_stopped = stat is not None and stat.state == "T"
            if fault.kind == "stop" and is_stopped and is_qemu_of(fault.pid, fault.uid, self.target.run_root):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(fault.pid, signal.SIGCONT)
                    continued.append(fault.pid)
        return continued

    # ---- timings from the controller's log

    def finish(self) -> None:
        """Last bookkeeping: the controller log's times when it is readable, then which faults
        met a controller outage."""
        if self.target.controller_log is not None:
            self._read_log(self.target.controller_log)
        for kill in self.controller_kills:
            # Down until the restarted controller runs its workers, not only until its fork.
            back = kill.started_logged_at or kill.restarted_at or math.inf
            for fault in self.faults:
                recovered = fault.recovered_at if fault.recovered_at is not None else math.inf
                fault.controller_outage = fault.controller_outage or (kill.at < recovered and fault.at < back)

    def _read_log(self, path: Path) -> None:
        """Prefer the controller's own times: when it wrote Running for the new pid, and when
        each restarted controller logged `controller_started`; add its spawns and exits to the
        QEMU lifetimes (a QEMU that lives for milliseconds slips between /proc scans)."""
        events = ServerLog(path).read_new()
        running: dict[tuple[str, int], list[float]] = {}
        started: list[float] = []
        for event in events:
            uid, pid = str(event.get("uid")), event.get("pid")
            if event.name == "status_written" and event.get("phase") == "Running" and pid:
                running.setdefault((uid, int(pid)), []).append(event.at)
            elif event.name == "controller_started":
                started.append(event.at)
            elif event.name == "vm_spawned" and pid:
                self.lifetimes.setdefault(uid, {}).setdefault(int(pid), Lifetime()).spawned = event.at
            elif event.name == "vm_exit_detected" and pid:
                self.lifetimes.setdefault(uid, {}).setdefault(int(pid), Lifetime()).exited = event.at
        for fault in self.faults:
            if fault.recovered_at is None or fault.new_pid is None or fault.new_pid == fault.pid:
                continue
            times = [at for at in running.get((fault.uid, fault.new_pid), []) if at >= fault.at]
            if times and min(times) <= fault.recovered_at:
                fault.recovered_at, fault.timing = min(times), "log"
        for kill in self.controller_kills:
            later = [at for at in started if at >= kill.at]
            kill.started_logged_at = min(later) if later else None
