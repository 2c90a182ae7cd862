"""QEMU's supervisor records how QEMU ended, even once the process that spawned it is gone.

A stand-in for QEMU (a Python sleeper) runs under the real supervisor script, spawned by the
real `process.spawn`.
"""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.qemu import process
from controller.qemu.argv import RuntimePaths

NOW = datetime(2026, 11, 22, tzinfo=UTC)
SLEEPER = (sys.executable, "-c", "import time; time.sleep(60)")
WAIT_SECONDS = 10.0


def _wait_status(paths: RuntimePaths, pid: int) -> process.WaitStatus:
    deadline = time.monotonic() + WAIT_SECONDS
    while (status := process.read_wait_status(paths, pid)) is None:
        assert time.monotonic() < deadline, f"no wait status for {pid}"
        time.sleep(0.02)
    return status


def _launched(paths: RuntimePaths) -> process.LaunchRecord:
    record = process.read_launch_record(paths)
    assert record is not None
    return record


def test_a_kill_9_is_recorded_with_its_signal_and_the_supervisor_exits(tmp_path: Path) -> None:
    paths = RuntimePaths(tmp_path / "vm")
    supervisor = process.spawn(SLEEPER, "d", paths, now=NOW)
    record = _launched(paths)
    assert record.supervisor is not None
    assert record.supervisor[0] == supervisor.pid
    assert process.supervisor_alive(record)

    os.kill(record.pid, signal.SIGKILL)

    assert supervisor.wait(timeout=WAIT_SECONDS) == 0
    status = _wait_status(paths, record.pid)
    assert (status.exit_code, status.signal) == (None, signal.SIGKILL)
    assert not process.supervisor_alive(record)


def test_an_exit_code_is_recorded(tmp_path: Path) -> None:
    paths = RuntimePaths(tmp_path / "vm")
    supervisor = process.spawn((sys.executable, "-c", "raise SystemExit(3)"), "d", paths, now=NOW)
    supervisor.wait(timeout=WAIT_SECONDS)
    status = _wait_status(paths, _launched(paths).pid)
    assert (status.exit_code, status.signal) == (3, None)


def test_the_exit_record_carries_the_wait_status(tmp_path: Path) -> None:
    paths = RuntimePaths(tmp_path / "vm")
    supervisor = process.spawn((sys.executable, "-c", "raise SystemExit(0)"), "d", paths, now=NOW)
    supervisor.wait(timeout=WAIT_SECONDS)
    process.record_exit(paths, _launched(paths), now=NOW)
    exit_record = process.read_exit_record(paths)
    assert exit_record is not None
    assert (exit_record.exit_code, exit_record.signal, exit_record.started_at) == (0, None, NOW)
    assert exit_record.at > NOW, "the time the supervisor saw the exit, not the caller's clock"


def test_a_missing_binary_fails_the_spawn_with_the_reason(tmp_path: Path) -> None:
    paths = RuntimePaths(tmp_path / "vm")
    with pytest.raises(process.SpawnFailed, match="cannot execute"):
        process.spawn(("/nonexistent/qemu-system-x86_64",), "d", paths, now=NOW)


def test_an_exec_failure_in_the_supervisor_fails_the_spawn_with_the_reason(tmp_path: Path) -> None:
    paths = RuntimePaths(tmp_path / "vm")
    not_a_program = tmp_path / "qemu"
    not_a_program.write_bytes(b"\x00\x01 not an executable format")
    not_a_program.chmod(0o755)
    with pytest.raises(process.SpawnFailed, match=r"cannot execute .*Exec format error"):
        process.spawn((str(not_a_program),), "d", paths, now=NOW)


def test_the_supervisor_outlives_the_process_that_spawned_it(tmp_path: Path) -> None:
    """A controller killed with -9 right after spawning: the exit is still recorded."""
    paths = RuntimePaths(tmp_path / "vm")
    controller = (
        "import os, sys; from datetime import datetime, UTC; from pathlib import Path\n"
        "from controller.qemu import process; from controller.qemu.argv import RuntimePaths\n"
        f"process.spawn({SLEEPER!r}, 'd', RuntimePaths(Path({str(paths.directory)!r})), "
        "now=datetime.now(UTC))\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run([sys.executable, "-c", controller], check=False, timeout=30)
    assert done.returncode == -signal.SIGKILL
    record = _launched(paths)
    assert process.supervisor_alive(record)
    assert process.is_alive_and_ours(record)

    os.kill(record.pid, signal.SIGKILL)

    status = _wait_status(paths, record.pid)
    assert status.signal == signal.SIGKILL


def test_a_sigterm_to_the_supervisor_goes_to_qemu_and_is_recorded(tmp_path: Path) -> None:
    paths = RuntimePaths(tmp_path / "vm")
    supervisor = process.spawn(SLEEPER, "d", paths, now=NOW)
    record = _launched(paths)

    supervisor.terminate()

    assert supervisor.wait(timeout=WAIT_SECONDS) == 0
    assert _wait_status(paths, record.pid).signal == signal.SIGTERM
    assert not process.is_alive_and_ours(record)


def test_qemu_ignores_and_blocks_no_signal(tmp_path: Path) -> None:
    """Python ignores SIGPIPE and SIGXFSZ, and a server started under nohup ignores SIGHUP (the
    test ignores it and blocks SIGUSR1 here, as such a parent would): QEMU inherits none of it."""
    paths = RuntimePaths(tmp_path / "vm")
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        supervisor = process.spawn(("cat", "/proc/self/status"), "d", paths, now=NOW)  # into qemu.stderr
    finally:
        signal.signal(signal.SIGHUP, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    supervisor.wait(timeout=WAIT_SECONDS)
    assert _wait_status(paths, _launched(paths).pid).exit_code == 0
    status = Path(paths.stderr_log).read_text().splitlines()
    assert [line for line in status if line.startswith("SigIgn:")] == ["SigIgn:\t0000000000000000"]
    assert [line for line in status if line.startswith("SigBlk:")] == ["SigBlk:\t0000000000000000"]


def test_a_status_of_another_pid_is_not_taken(tmp_path: Path) -> None:
    paths = RuntimePaths(tmp_path / "vm")
    Path(paths.directory).mkdir()
    Path(paths.wait_status).write_text('{"pid": 41, "exitCode": 0, "signal": null, "at": 1.0}')
    assert process.read_wait_status(paths, 42) is None
    expected = process.WaitStatus(0, None, datetime.fromtimestamp(1.0, UTC))
    assert process.read_wait_status(paths, 41) == expected


def test_the_supervisor_imports_only_built_in_modules() -> None:
    """Each import of a Python-level module would cost memory in every VM's supervisor."""
    tree = ast.parse(process.SUPERVISOR_SCRIPT.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(isinstance(node, ast.ImportFrom) for node in ast.walk(tree))
    assert imported == {"_signal", "posix", "sys", "time"}
    assert imported <= set(sys.builtin_module_names)


def test_a_controller_gone_before_the_report_still_leaves_a_launch_record(tmp_path: Path) -> None:
    """The report pipe's reader is closed (the controller was killed mid-spawn): the supervisor
    writes the launch record, supervises, and records the exit all the same."""
    paths = RuntimePaths(tmp_path / "vm")
    Path(paths.directory).mkdir()
    report_read, report_write = os.pipe()
    os.close(report_read)
    record_start = '{"argv": ["sleep", "60"], "digest": "d", "startedAt": "2026-11-22T00:00:00+00:00", '
    argv = [
        *process._supervisor_argv(paths),
        record_start,
        str(report_write),
        shutil.which("sleep") or "sleep",
    ]
    supervisor = subprocess.Popen([*argv, "sleep", "60"], pass_fds=(report_write,), start_new_session=True)
    os.close(report_write)
    deadline = time.monotonic() + WAIT_SECONDS
    while (record := process.read_launch_record(paths)) is None:
        assert supervisor.poll() is None, "the supervisor died"
        assert time.monotonic() < deadline, "no launch record"
        time.sleep(0.02)
    assert record.supervisor is not None
    assert record.supervisor[0] == supervisor.pid
    assert process.is_alive_and_ours(record)
    assert process.supervisor_alive(record)

    os.kill(record.pid, signal.SIGKILL)

    assert supervisor.wait(timeout=WAIT_SECONDS) == 0
    assert _wait_status(paths, record.pid).signal == signal.SIGKILL
