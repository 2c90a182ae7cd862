"""QEMU processes: spawn, prove identity, record launches and exits, signal.

Identity rule: a process is ours only if the pidfile QEMU wrote, our launch record, and
/proc/PID (start time and cmdline) all agree. A reused PID has another start time or cmdline,
so it is never mistaken for a VM.

No duplicate QEMU per VM: spawn takes an exclusive flock on DATA/run/<uid>/lock and hands the
locked descriptor to QEMU, which then holds the lock for its whole life. A second spawn for the
same uid cannot take it and fails safely, even from another controller process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from controller.model import ExitObservation
from controller.qemu.argv import QEMU_BINARY, RuntimePaths

STDERR_TAIL_LINES = 15
STDERR_TAIL_BYTES = 4096
_STALE_FILES = ("pidfile", "qmp_socket", "record", "exit_record")
_GUEST_SHUTDOWN_MARKER = "guest-shutdown"


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

    def encode(self) -> str:
        return json.dumps(
            {
                "argv": list(self.argv),
                "digest": self.digest,
                "pid": self.pid,
                "startTicks": self.start_ticks,
                "startedAt": self.started_at.isoformat(),
            }
        )

    @classmethod
    def decode(cls, text: str) -> LaunchRecord:
        """:raise ValueError: a record this controller did not write."""
        try:
            data = json.loads(text)
            return cls(
                argv=tuple(data["argv"]),
                digest=data["digest"],
                pid=int(data["pid"]),
                start_ticks=int(data["startTicks"]),
                started_at=datetime.fromisoformat(data["startedAt"]),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"unreadable launch record: {err}") from err


@dataclass(frozen=True, slots=True)
class ProcStat:
    state: str
    parent_pid: int
    start_ticks: int


def read_stat(pid: int) -> ProcStat | None:
    """State and start time of `pid` from /proc, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) is in parentheses and may hold spaces or ')': split after the last ')'.
    fields = text.rpartition(")")[2].split()
    return ProcStat(state=fields[0], parent_pid=int(fields[1]), start_ticks=int(fields[19]))


def read_cmdline(pid: int) -> tuple[str, ...] | None:
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
    stat = read_stat(record.pid)
    if stat is None or stat.state in ("Z", "X") or stat.start_ticks != record.start_ticks:
        return False
    return identity_proven or read_cmdline(record.pid) == record.argv


def spawn(
    argv: tuple[str, ...], digest: str, runtime: RuntimePaths, *, now: datetime
) -> subprocess.Popen[bytes]:
    """Start QEMU in its own session (so it outlives the controller) and record the launch.

    :raise DuplicateProcess: another QEMU of this VM is alive.
    :raise SpawnFailed: the binary could not be executed.
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
        with open(runtime.stderr_log, "wb") as stderr:
            try:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    start_new_session=True,
                    pass_fds=(lock_fd,),
                    cwd=directory,
                )
            except OSError as err:
                raise SpawnFailed(f"cannot execute {argv[0]}: {err}") from err
    finally:
        os.close(lock_fd)
    stat = read_stat(process.pid)
    record = LaunchRecord(
        argv=argv,
        digest=digest,
        pid=process.pid,
        start_ticks=stat.start_ticks if stat else -1,
        started_at=now,
    )
    _write_atomically(Path(runtime.record), record.encode())
    return process


def clear_stale_files(runtime: RuntimePaths) -> None:
    """Remove what a dead process left. Missing files are fine (idempotent)."""
    for name in _STALE_FILES:
        with contextlib.suppress(FileNotFoundError):
            Path(getattr(runtime, name)).unlink()
    with contextlib.suppress(FileNotFoundError):
        (Path(runtime.directory) / _GUEST_SHUTDOWN_MARKER).unlink()


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
