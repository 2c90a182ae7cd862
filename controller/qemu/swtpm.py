"""The VMs' swtpm processes: started, proven ours, watched, adopted and ended like QEMU.

A swtpm is a per-VM helper (qemu/sidecar.py): spawned under the per-VM supervisor with its
launch record in DATA/run/<uid>/tpm/, adopted after a controller restart, and its exit wakes the
VM; a QEMU that lost its TPM is then restarted by the plan (controller/firmware.py).

It serves one QEMU and exits when that QEMU closes its socket (`--terminate`), so every start of
QEMU gets a fresh one: a guest's TPM never outlives its boot unless `persistent` keeps its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

from controller.clock import Clock
from controller.firmware import TpmFailed
from controller.qemu.argv import RuntimePaths
from controller.qemu.firmware import TPM_SOCKET_NAME, TPM_STATE_DIR_NAME, swtpm_argv, tpm_paths
from controller.qemu.sidecar import LISTEN_SECONDS, STOP_SECONDS, SidecarKind, SidecarProgram

__all__ = ["LISTEN_SECONDS", "STOP_SECONDS", "Swtpm"]

SWTPM = SidecarKind("swtpm", "tpm", tpm_paths, TpmFailed)


class Swtpm(SidecarProgram):
    """Implements controller.firmware.TpmEmulators with the `swtpm` binary."""

    def __init__(self, *, clock: Clock, wake: Callable[[str], None]) -> None:
        super().__init__(SWTPM, clock=clock, wake=wake)

    async def start(self, uid: str, paths: RuntimePaths, *, persistent: bool) -> None:
        await self.stop(uid, paths)
        directory = Path(tpm_paths(paths).directory)
        state = directory / TPM_STATE_DIR_NAME
        try:
            if not persistent:
                await asyncio.to_thread(shutil.rmtree, state, True)
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileNotFoundError):
                (directory / TPM_SOCKET_NAME).unlink()
        except OSError as err:
            raise TpmFailed(f"the TPM state dir {state}: {err.strerror}") from err
        await self._processes.launch(uid, paths, swtpm_argv(), TPM_SOCKET_NAME)
