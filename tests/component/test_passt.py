"""The passt supervision (controller/qemu/passt.py) with the real `passt` from Debian's package:
started under the per-VM supervisor as the user nobody, its forwards bound on loopback, proven
ours, adopted by a new controller, its death waking the VM, ended; and the start-up probe.
No QEMU: nothing connects, so each passt waits for its one client."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from api.types import NetworkSpec, Protocol
from controller.clock import LoopClock
from controller.model import SidecarObservation
from controller.network import PasstFailed
from controller.qemu import process
from controller.qemu.argv import RuntimePaths
from controller.qemu.netargs import passt_argv, passt_paths, socket_of
from controller.qemu.passt import PASST_USER, PROBE_SECONDS, Passt, probe
from tests.e2e.harness import free_loopback_port, run_setup_step

UID = "vm-passt"
WAKE_SECONDS = 10.0


@pytest.fixture(scope="module", autouse=True)
def passt_installed() -> None:
    """hack/install-qemu installs Debian's passt when it is missing (it does nothing otherwise)."""
    run_setup_step("install-qemu")


@pytest.fixture
async def paths(tmp_path: Path) -> AsyncIterator[RuntimePaths]:
    """The VM's runtime dir (root-only, like the controller's); any passt left is killed at the end."""
    runtime = RuntimePaths(tmp_path / UID)
    Path(runtime.directory).mkdir(mode=0o700)
    yield runtime
    record = process.read_launch_record(passt_paths(runtime))
    if record is not None:
        process.send_signal(record, signal.SIGKILL)


def forwarded_argv(host_port: int) -> tuple[str, ...]:
    network = NetworkSpec.model_validate({"mode": "passt", "forwards": [{"guestPort": 80}]})
    return passt_argv(network, {(Protocol.TCP, 80): host_port}, "127.0.0.1")


def new_controller() -> tuple[Passt, asyncio.Queue[str]]:
    woken: asyncio.Queue[str] = asyncio.Queue()
    return Passt(clock=LoopClock(), wake=woken.put_nowait), woken


def accepts(port: int) -> bool:
    with socket.socket() as client:
        client.settimeout(2.0)
        return client.connect_ex(("127.0.0.1", port)) == 0


async def test_a_started_passt_binds_its_socket_and_forwards_as_nobody(paths: RuntimePaths) -> None:
    passts, _ = new_controller()
    port = free_loopback_port()
    argv = forwarded_argv(port)
    await passts.start(UID, paths, argv)
    try:
        found = await passts.inspect(UID, paths)
        assert found is not None
        assert found.watched
        directory = Path(passt_paths(paths).directory)
        assert (directory / socket_of(argv)).is_socket()
        assert process.read_cmdline(found.pid) == argv
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        if os.geteuid() == 0:
            nobody = pwd.getpwnam(PASST_USER).pw_uid
            assert directory.stat().st_uid == nobody
            assert os.stat(f"/proc/{found.pid}").st_uid == nobody
        assert accepts(port)
        assert os.getsid(found.pid) != os.getsid(0)
    finally:
        await passts.stop(UID, paths)
        await passts.close()
    assert not accepts(port)


async def test_a_new_controller_adopts_it_and_its_death_wakes_the_vm(paths: RuntimePaths) -> None:
    first, _ = new_controller()
    await first.start(UID, paths, forwarded_argv(free_loopback_port()))
    pid = (await first.inspect(UID, paths) or SidecarObservation(0)).pid
    await first.close()  # the controller exits; passt runs on

    second, woken = new_controller()
    assert await second.inspect(UID, paths) == SidecarObservation(pid, watched=False)
    await second.attach(UID, paths, pid)
    assert await second.inspect(UID, paths) == SidecarObservation(pid, watched=True)
    os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(WAKE_SECONDS):
        assert await woken.get() == UID
    assert await second.inspect(UID, paths) is None


async def test_a_start_replaces_a_leftover_and_stop_is_idempotent(paths: RuntimePaths) -> None:
    passts, _ = new_controller()
    await passts.start(UID, paths, forwarded_argv(free_loopback_port()))
    first = (await passts.inspect(UID, paths) or SidecarObservation(0)).pid
    await passts.start(UID, paths, forwarded_argv(free_loopback_port()))
    second = (await passts.inspect(UID, paths) or SidecarObservation(0)).pid
    assert second != first
    await passts.stop(UID, paths)
    assert await passts.inspect(UID, paths) is None
    await passts.stop(UID, paths)
    await passts.close()


async def test_a_taken_forward_port_is_a_clear_error(paths: RuntimePaths) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        passts, _ = new_controller()
        port = taken.getsockname()[1]
        with pytest.raises(PasstFailed, match="passt exited at start: ") as caught:
            await passts.start(UID, paths, forwarded_argv(port))
    assert f"Failed to bind any port for '-t 127.0.0.1/{port}:80'" in str(caught.value)
    assert await passts.inspect(UID, paths) is None


async def test_a_missing_passt_is_a_clear_error(paths: RuntimePaths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(Path(paths.directory)))
    passts, _ = new_controller()
    with pytest.raises(PasstFailed, match="passt cannot start: cannot execute passt: not found on PATH"):
        await passts.start(UID, paths, forwarded_argv(free_loopback_port()))
    assert probe() == "passt is not installed (Debian's passt package)"


def test_the_probe_finds_passt_usable_here(tmp_path: Path) -> None:
    assert probe(tmp_path) == ""
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself
    assert PROBE_SECONDS == 5.0
