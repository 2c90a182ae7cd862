"""QEMU processes: spawn, prove identity, record launches and exits, signal.

Identity rule: a process is ours only if the pidfile QEMU wrote, our launch record, and
/proc/PID (start time and cmdline) all agree. A reused PID has another start time or cmdline,
so it is never mistaken for a VM.

No duplicate QEMU per VM: spawn takes an exclusive flock on DATA/run/<uid>/lock and hands the
locked descriptor to QEMU, which then holds the lock for its whole life. A second spawn for the
same uid cannot take it and fails safely, even from another controller process.

QEMU's parent is its supervisor (supervisor.py), not the controller: it records QEMU's wait
status in the runtime dir, so an exit is known exactly even after a controller restart. VMs
started before the supervisor existed have none in their launch record and are watched directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from controller.model import ExitObservation
from controller.qemu import supervisor
from controller.qemu.argv import QEMU_BINARY, RuntimePaths

STDERR_TAIL_LINES = 15
STDERR_TAIL_BYTES = 4096
_STALE_FILES = ("pidfile", "qmp_socket", "record", "exit_record", "wait_status")
# The supervisor forks and execs QEMU within milliseconds; this bounds a wedged interpreter.
SUPERVISOR_REPORT_SECONDS = 10.0
SUPERVISOR_SCRIPT = Path(supervisor.__file__)
_GUEST_SHUTDOWN_MARKER = "guest-shutdown"
# /proc/PID/stat is one line of 52 fields; comm holds at most 64 bytes.
_STAT_BYTES = 4096


class SpawnFailed(Exception):
    """QEMU could not be started or exited during start-up; the message holds its stderr."""


class DuplicateProcess(SpawnFailed):
    """Another QEMU of this VM holds the runtime lock."""


@dataclass(frozen=True, slots=True)
class LaunchRecord:
    """What the controller knows about a QEMU it started, written next to the pidfile."""

    argv: tuple[str, ...]
    digest: str
    pid: int
    start_ticks: int
    started_at: datetime
    # QEMU's supervisor (pid, /proc start time); None for a QEMU started before supervisors.
    supervisor: tuple[int, int] | None = None

    def encode(self) -> str:
        return json.dumps(
            {
                "argv": list(self.argv),
                "digest": self.digest,
                "pid": self.pid,
                "startTicks": self.start_ticks,
                "startedAt": self.started_at.isoformat(),
                "supervisor": None
                if self.supervisor is None
                else {"pid": self.supervisor[0], "startTicks": self.supervisor[1]},
            }
        )

    @classmethod
    def decode(cls, text: str) -> LaunchRecord:
        """:raise ValueError: a record this controller did not write."""
        try:
            data = json.loads(text)
            watcher = data.get("supervisor")
            return cls(
                argv=tuple(data["argv"]),
                digest=data["digest"],
                pid=int(data["pid"]),
                start_ticks=int(data["startTicks"]),
                started_at=datetime.fromisoformat(data["startedAt"]),
                supervisor=None if watcher is None else (int(watcher["pid"]), int(watcher["startTicks"])),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"unreadable launch record: {err}") from err


@dataclass(frozen=True, slots=True)
class ProcStat:
    state: str
    parent_pid: int
    start_ticks: int

    @property
    def is_running(self) -> bool:
        """Not a zombie: a PID 1 that reaps orphans lazily leaves /proc/PID of a dead process."""
        return self.state not in ("Z", "X")


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """A process as pid plus /proc start time, so a reused pid is never taken for the same process."""

    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of the process `pid` now, or None if there is no such process."""
        stat = read_stat(pid)
        return None if stat is None else cls(pid, stat.start_ticks)

    @property
    def is_running(self) -> bool:
        """This very process still runs (not a zombie, not a later one that reuses the pid)."""
        stat = read_stat(self.pid)
        return stat is not None and stat.is_running and stat.start_ticks == self.start_ticks


def is_running_process(pid: int) -> bool:
    """Some process `pid` runs (not a zombie), whichever it is."""
    stat = read_stat(pid)
    return stat is not None and stat.is_running


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/`pid`/stat after comm (the first is the state, field 3), or None if
    there is no such process. Shared by every per-VM reader: the resync, the usage sampler."""
    try:
        # os-level: a third of Path.read_text's cost, for reads made per VM per resync.
        descriptor = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    try:
        text = os.read(descriptor, _STAT_BYTES)
    except ProcessLookupError:
        return None
    finally:
        os.close(descriptor)
    # comm (field 2) is in parentheses and may hold spaces or ')': split after the last ')'.
    return text.rpartition(b")")[2].split()


def read_stat(pid: int) -> ProcStat | None:
    """State and start time of `pid` from /proc, or None if there is no such process."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    return ProcStat(state=fields[0].decode(), parent_pid=int(fields[1]), start_ticks=int(fields[19]))


def read_cmdline(pid: int) -> tuple[str, ...] | None:
    """The argv of `pid` from /proc, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return tuple(part.decode(errors="surrogateescape") for part in raw.split(b"\0")[:-1])


def read_pidfile(runtime: RuntimePaths) -> int | None:
    try:
        return int(Path(runtime.pidfile).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def read_launch_record(runtime: RuntimePaths) -> LaunchRecord | None:
    try:
        return LaunchRecord.decode(Path(runtime.record).read_text())
    except (FileNotFoundError, ValueError):
        return None


def is_alive_and_ours(record: LaunchRecord, *, identity_proven: bool = False) -> bool:
    """The recorded process still runs (not a zombie) and is the one we started.

    `identity_proven`: the cmdline was checked already and the PID is pinned (a pidfd is held),
    so only liveness is left to check.
    """
    if not ProcessIdentity(record.pid, record.start_ticks).is_running:
        return False
    return identity_proven or read_cmdline(record.pid) == record.argv


def spawn(
    argv: tuple[str, ...], digest: str, runtime: RuntimePaths, *, now: datetime
) -> subprocess.Popen[bytes]:
    """Start QEMU under its supervisor, in a session of their own (so both outlive the
    controller), and record the launch. Returns the supervisor, the controller's child.

    :raise DuplicateProcess: another QEMU of this VM is alive.
    :raise SpawnFailed: QEMU or its supervisor could not be executed.
    """
    directory = Path(runtime.directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = os.open(runtime.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise DuplicateProcess(f"another QEMU of this VM holds {runtime.lock}") from err
        clear_stale_files(runtime)
        # The supervisor writes the launch record itself, completing what only the controller knows.
        record_start = json.dumps({"argv": list(argv), "digest": digest, "startedAt": now.isoformat()})
        watcher, pid = _start_supervised(argv, runtime, lock_fd, record_start[:-1] + ", ")
    finally:
        os.close(lock_fd)
    record = read_launch_record(runtime)
    if (
        record is None
        or record.pid != pid
        or record.supervisor is None
        or record.supervisor[0] != watcher.pid
    ):
        raise SpawnFailed(f"the supervisor (pid {watcher.pid}) wrote no launch record for QEMU pid {pid}")
    return watcher


def _start_supervised(
    argv: tuple[str, ...], runtime: RuntimePaths, lock_fd: int, record_start: str
) -> tuple[subprocess.Popen[bytes], int]:
    """Run the supervisor (which holds `lock_fd` and hands it to QEMU); return it and QEMU's pid."""
    executable = shutil.which(argv[0])
    if executable is None:
        raise SpawnFailed(f"cannot execute {argv[0]}: not found on PATH")
    report_read, report_write = os.pipe()
    try:
        with open(runtime.stderr_log, "wb") as stderr:
            try:
                watcher = subprocess.Popen(
                    [*_supervisor_argv(runtime), record_start, str(report_write), executable, *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    start_new_session=True,
                    pass_fds=(lock_fd, report_write),
                    cwd=runtime.directory,
                )
            except OSError as err:
                raise SpawnFailed(f"cannot execute the supervisor {sys.executable}: {err}") from err
        os.close(report_write)
        report_write = -1
        report = _read_report(report_read)
    finally:
        os.close(report_read)
        if report_write >= 0:
            os.close(report_write)
    if not report.strip().isdigit():
        watcher.kill()
        watcher.wait()
        why = report.removeprefix("error: ") or f"the supervisor gave no pid: {stderr_tail(runtime)}"
        raise SpawnFailed(why)
    return watcher, int(report)


def _supervisor_argv(runtime: RuntimePaths) -> list[str]:
    # -I -S: no site-packages, no environment, no import but built-in modules.
    return [sys.executable, "-I", "-S", str(SUPERVISOR_SCRIPT), str(runtime.wait_status), str(runtime.record)]


def _read_report(fd: int) -> str:
    """What the supervisor wrote before closing its end, within SUPERVISOR_REPORT_SECONDS."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    deadline = time.monotonic() + SUPERVISOR_REPORT_SECONDS
    while (left := deadline - time.monotonic()) > 0 and poller.poll(left * 1000):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def clear_stale_files(runtime: RuntimePaths) -> None:
    """Remove what a dead process left. Missing files are fine (idempotent)."""
    for name in _STALE_FILES:
        with contextlib.suppress(FileNotFoundError):
            Path(getattr(runtime, name)).unlink()
    with contextlib.suppress(FileNotFoundError):
        (Path(runtime.directory) / _GUEST_SHUTDOWN_MARKER).unlink()


def has_stale_files(runtime: RuntimePaths) -> bool:
    """Whether a process left its pidfile, socket, launch or exit record behind."""
    return any(Path(getattr(runtime, name)).exists() for name in _STALE_FILES)


def mark_guest_shutdown(runtime: RuntimePaths) -> None:
    """Remember that QMP reported a guest-initiated shutdown, for the exit record."""
    with contextlib.suppress(FileNotFoundError):
        (Path(runtime.directory) / _GUEST_SHUTDOWN_MARKER).touch()


def write_exit_record(
    runtime: RuntimePaths,
    *,
    exit_code: int | None,
    signal: int | None,
    started_at: datetime | None,
    now: datetime,
) -> None:
    guest_shutdown = (Path(runtime.directory) / _GUEST_SHUTDOWN_MARKER).exists()
    record = {
        "at": now.isoformat(),
        "exitCode": exit_code,
        "signal": signal,
        "guestShutdown": guest_shutdown,
        "startedAt": started_at.isoformat() if started_at else None,
        "stderrTail": stderr_tail(runtime),
    }
    with contextlib.suppress(FileNotFoundError):
        _write_atomically(Path(runtime.exit_record), json.dumps(record))


@dataclass(frozen=True, slots=True)
class WaitStatus:
    """How QEMU ended, as its supervisor's waitpid saw it."""

    exit_code: int | None
    signal: int | None
    at: datetime


def read_wait_status(runtime: RuntimePaths, pid: int) -> WaitStatus | None:
    """The wait status the supervisor recorded for QEMU `pid`, if it did."""
    try:
        data = json.loads(Path(runtime.wait_status).read_text())
        if data["pid"] != pid:
            return None
        return WaitStatus(data["exitCode"], data["signal"], datetime.fromtimestamp(data["at"], UTC))
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return None


def supervisor_alive(record: LaunchRecord) -> bool:
    """The supervisor the launch record names still runs (so it will record QEMU's exit)."""
    return record.supervisor is not None and ProcessIdentity(*record.supervisor).is_running


def record_exit(runtime: RuntimePaths, record: LaunchRecord, *, now: datetime) -> WaitStatus | None:
    """Write the exit record of the process `record` describes, which is gone: with the wait
    status its supervisor left (and the time it saw the exit), or unknown without one."""
    status = read_wait_status(runtime, record.pid)
    write_exit_record(
        runtime,
        exit_code=status.exit_code if status else None,
        signal=status.signal if status else None,
        started_at=record.started_at,
        now=status.at if status else now,
    )
    return status


def read_exit_record(runtime: RuntimePaths) -> ExitObservation | None:
    try:
        data = json.loads(Path(runtime.exit_record).read_text())
        return ExitObservation(
            at=datetime.fromisoformat(data["at"]),
            exit_code=data["exitCode"],
            signal=data["signal"],
            guest_shutdown=bool(data["guestShutdown"]),
            started_at=datetime.fromisoformat(data["startedAt"]) if data["startedAt"] else None,
            stderr_tail=str(data.get("stderrTail", "")),
        )
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return None


def stderr_tail(runtime: RuntimePaths) -> str:
    """The last lines QEMU wrote to stderr, for conditions and exit records."""
    try:
        with open(runtime.stderr_log, "rb") as stderr:
            stderr.seek(0, os.SEEK_END)
            stderr.seek(max(0, stderr.tell() - STDERR_TAIL_BYTES))
            text = stderr.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.strip().splitlines()[-STDERR_TAIL_LINES:])


def send_signal(record: LaunchRecord, signal: int) -> None:
    """Signal our process; a process that is gone (or no longer ours) is success."""
    if not is_alive_and_ours(record):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signal)


def _write_atomically(path: Path, text: str) -> None:
    # The runtime dir may have been removed under a live VM; its exit must still be recorded.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def find_lost(runtime: RuntimePaths) -> int | None:
    """A QEMU still running in this VM's runtime dir although the dir (or its launch record) is
    gone: its working directory is the runtime dir, shown as "<dir> (deleted)" once removed.

    Scans /proc, so it is asked only when a process is expected and none is on record.
    """
    directory = str(runtime.directory)
    wanted = {directory, f"{directory} (deleted)"}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.readlink(f"/proc/{pid}/cwd") not in wanted:
                continue
        except OSError:
            continue
        argv = read_cmdline(pid)
        if argv and Path(argv[0]).name == QEMU_BINARY:
            return pid
    return None
