"""The VMs' passt processes (docs/networking.md): one per QEMU, a helper like swtpm (sidecar.py).

passt started as root changes to the user `nobody` before it binds its UNIX socket, and then
sandboxes itself (its own user, mount, IPC, UTS and PID namespaces, seccomp). So its dir,
DATA/run/<uid>/passt/, belongs to that user: passt binds its socket by a name relative to that
dir (its working directory), which needs no access to the root-only dirs above it. The launch
record and the lock in it are the supervisor's, written as root before passt runs.

passt needs to create a user namespace at start. Where it cannot (Docker's default seccomp
profile refuses `unshare`), `probe` says so once at start-up, and a spec asking for mode passt
is Valid=False with that reason (controller/network.py).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from controller.clock import Clock
from controller.network import PasstFailed
from controller.qemu.argv import RuntimePaths
from controller.qemu.netargs import PASST_BINARY, passt_paths, socket_of
from controller.qemu.sidecar import SidecarKind, SidecarProgram

PASST = SidecarKind("passt", "passt", passt_paths, PasstFailed)
# The user passt changes to when started as root (its default, which it does not let us avoid).
PASST_USER = "nobody"
# A start-up probe: passt binds its socket within milliseconds, or fails at once.
PROBE_SECONDS = 5.0
_PROBE_POLL_SECONDS = 0.02


class Passt(SidecarProgram):
    """Implements controller.network.PasstNetworks with the `passt` binary."""

    def __init__(self, *, clock: Clock, wake: Callable[[str], None]) -> None:
        super().__init__(PASST, clock=clock, wake=wake)

    async def start(self, uid: str, paths: RuntimePaths, argv: tuple[str, ...]) -> None:
        await self.stop(uid, paths)
        directory = Path(passt_paths(paths).directory)
        try:
            prepare_dir(directory)
        except OSError as err:
            raise PasstFailed(f"passt's dir {directory}: {err.strerror}") from err
        await self._processes.launch(uid, paths, argv, socket_of(argv))


def prepare_dir(directory: Path) -> None:
    """passt's dir, 0700, owned by the user passt runs as, without the sockets of earlier runs."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.geteuid() == 0:
        user = pwd.getpwnam(PASST_USER)
        os.chown(directory, user.pw_uid, user.pw_gid)
    for socket in directory.glob("*.sock"):
        with contextlib.suppress(FileNotFoundError):
            socket.unlink()


def probe(scratch: Path | None = None) -> str:
    """Why passt cannot run here ("" when it can): start one on a scratch socket and see it bind.
    Blocking (at most PROBE_SECONDS); run once at start-up, in a thread."""
    if shutil.which(PASST_BINARY) is None:
        return "passt is not installed (Debian's passt package)"
    with tempfile.TemporaryDirectory(prefix="passt-probe-", dir=scratch) as temporary:
        directory = Path(temporary) / "passt"
        prepare_dir(directory)
        argv = [PASST_BINARY, "--foreground", "--quiet", "--one-off", "--socket", "probe.sock"]
        errors = directory.parent / "stderr"
        with errors.open("wb") as stderr:
            child = subprocess.Popen(
                argv, cwd=directory, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        try:
            return _wait_bound(child, directory / "probe.sock", errors)
        finally:
            child.kill()
            child.wait()


def _wait_bound(child: subprocess.Popen[bytes], socket: Path, errors: Path) -> str:
    deadline = time.monotonic() + PROBE_SECONDS
    while time.monotonic() < deadline:
        if socket.exists():
            return ""
        if child.poll() is not None:
            break
        time.sleep(_PROBE_POLL_SECONDS)
    lines = [line for line in errors.read_text(errors="replace").splitlines() if "syslog" not in line]
    detail = lines[-1] if lines else f"exit status {child.poll()}"
    return f"passt does not start ({detail}); in a container it needs unshare, see docs/networking.md"
