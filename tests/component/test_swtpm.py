"""The swtpm supervision (controller/qemu/swtpm.py) with the real `swtpm` from Debian's package:
started under the per-VM supervisor, proven ours, watched, adopted by a new controller, ended,
and its state kept or wiped. No QEMU: nothing connects, so each swtpm waits for its client."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.clock import LoopClock
from controller.firmware import TpmFailed
from controller.model import TpmObservation
from controller.qemu import process
from controller.qemu.argv import RuntimePaths
from controller.qemu.firmware import TPM_SOCKET_NAME, TPM_STATE_DIR_NAME, swtpm_argv, tpm_paths
from controller.qemu.swtpm import LISTEN_SECONDS, STOP_SECONDS, Swtpm
from tests.e2e.harness import run_setup_step

UID = "vm-tpm"
WAKE_SECONDS = 10.0


@pytest.fixture(scope="module", autouse=True)
def swtpm_installed() -> None:
    """hack/install-qemu installs Debian's swtpm when it is missing (it does nothing otherwise)."""
    if shutil.which("swtpm") is None:
        run_setup_step("install-qemu")


@pytest.fixture
async def paths(tmp_path: Path) -> AsyncIterator[RuntimePaths]:
    """The VM's runtime dir; any swtpm left in it is killed at the end."""
    runtime = RuntimePaths(tmp_path / UID)
    Path(runtime.directory).mkdir(mode=0o700)
    yield runtime
    record = process.read_launch_record(tpm_paths(runtime))
    if record is not None:
        process.send_signal(record, signal.SIGKILL)


def new_controller() -> tuple[Swtpm, asyncio.Queue[str]]:
    woken: asyncio.Queue[str] = asyncio.Queue()
    return Swtpm(clock=LoopClock(), wake=woken.put_nowait), woken


async def test_a_started_swtpm_listens_is_ours_and_is_watched(paths: RuntimePaths) -> None:
    tpms, _ = new_controller()
    await tpms.start(UID, paths, persistent=False)
    try:
        found = await tpms.inspect(UID, paths)
        assert found is not None
        assert found.watched
        tpm = Path(tpm_paths(paths).directory)
        assert (tpm / TPM_SOCKET_NAME).is_socket()
        assert process.read_cmdline(found.pid) == swtpm_argv()
        assert stat.S_IMODE((tpm / TPM_STATE_DIR_NAME).stat().st_mode) == 0o700
        assert int((tpm / "swtpm.pid").read_text()) == found.pid
        # Its own session: a controller's terminal or process group never reaches it.
        assert os.getsid(found.pid) != os.getsid(0)
    finally:
        await tpms.stop(UID, paths)
        await tpms.close()


async def test_a_new_controller_adopts_it_and_its_death_wakes_the_vm(paths: RuntimePaths) -> None:
    first, _ = new_controller()
    await first.start(UID, paths, persistent=False)
    pid = (await first.inspect(UID, paths) or TpmObservation(0)).pid
    await first.close()  # the controller exits; swtpm runs on

    second, woken = new_controller()
    assert await second.inspect(UID, paths) == TpmObservation(pid, watched=False)
    await second.attach(UID, paths, pid)
    assert await second.inspect(UID, paths) == TpmObservation(pid, watched=True)

    os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(WAKE_SECONDS):
        assert await woken.get() == UID
    assert await second.inspect(UID, paths) is None
    assert second.watched_uids() == []


async def test_a_reused_pid_is_not_taken_for_swtpm(paths: RuntimePaths) -> None:
    """The launch record names a pid whose /proc start time or cmdline is another process's."""
    tpms, _ = new_controller()
    await tpms.start(UID, paths, persistent=False)
    await tpms.close()
    record = process.read_launch_record(tpm_paths(paths))
    assert record is not None
    forged = record.encode().replace(f'"pid": {record.pid}', f'"pid": {os.getpid()}')
    Path(tpm_paths(paths).record).write_text(forged)
    try:
        assert await new_controller()[0].inspect(UID, paths) is None
    finally:
        process.send_signal(record, signal.SIGKILL)


async def test_stop_ends_it_and_is_idempotent(paths: RuntimePaths) -> None:
    tpms, _ = new_controller()
    await tpms.start(UID, paths, persistent=False)
    pid = (await tpms.inspect(UID, paths) or TpmObservation(0)).pid
    await tpms.stop(UID, paths)
    assert await tpms.inspect(UID, paths) is None
    stat_now = process.read_stat(pid)
    assert stat_now is None or stat_now.state in ("Z", "X")
    await tpms.stop(UID, paths)  # nothing runs: success
    await tpms.close()


async def test_a_start_replaces_a_leftover_and_keeps_state_only_when_persistent(paths: RuntimePaths) -> None:
    tpms, _ = new_controller()
    state = Path(tpm_paths(paths).directory) / TPM_STATE_DIR_NAME
    await tpms.start(UID, paths, persistent=True)
    first = (await tpms.inspect(UID, paths) or TpmObservation(0)).pid
    (state / "marker").write_text("kept")

    await tpms.start(UID, paths, persistent=True)
    second = (await tpms.inspect(UID, paths) or TpmObservation(0)).pid
    assert second != first
    assert process.read_cmdline(first) != swtpm_argv()
    assert (state / "marker").read_text() == "kept"

    await tpms.start(UID, paths, persistent=False)
    assert not (state / "marker").exists()
    await tpms.stop(UID, paths)
    await tpms.close()


async def test_a_missing_swtpm_is_a_clear_error(paths: RuntimePaths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(Path(paths.directory)))
    tpms, _ = new_controller()
    with pytest.raises(TpmFailed, match="swtpm cannot start: cannot execute swtpm: not found on PATH"):
        await tpms.start(UID, paths, persistent=False)
    assert await tpms.inspect(UID, paths) is None


async def test_an_unusable_state_dir_is_a_clear_error(paths: RuntimePaths) -> None:
    """A file where the persistent state dir should be: refused before any swtpm starts."""
    tpms, _ = new_controller()
    tpm = Path(tpm_paths(paths).directory)
    tpm.mkdir(mode=0o700)
    (tpm / TPM_STATE_DIR_NAME).write_text("not a directory")
    with pytest.raises(TpmFailed, match=r"the TPM state dir .*/tpm/state: File exists"):
        await tpms.start(UID, paths, persistent=True)
    assert await tpms.inspect(UID, paths) is None


def test_documented_waits() -> None:
    """docs/firmware.md names these."""
    assert (LISTEN_SECONDS, STOP_SECONDS) == (10.0, 5.0)
