"""Choosing the accelerator for `accel: auto` by proof, not by the presence of /dev/kvm.

On nested hosts /dev/kvm can open and QMP can report KVM enabled while a Linux guest crawls
~400x slower and then hangs on an emulation failure
(docs/guest.md#qemu-behaviours-the-code-relies-on). So `auto` boots a tiny guest under KVM with
a deadline; only a guest that reaches its ready marker in time proves KVM.
The verdict is remembered in the data dir (per host kernel) so the probe runs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog

from api.types import Accel
from controller.qemu.argv import QEMU_BINARY

log = structlog.get_logger(__name__)
PROBE_KERNEL = "tiny-guest/vmlinuz"
PROBE_INITRD = "tiny-guest/initramfs.cpio.gz"
READY_MARKER = b"TOFU-GUEST-READY"
# TCG boots the probe guest in ~3 s on a busy 2-core host; working KVM is faster still, and
# broken nested KVM never gets there (it hangs), so a generous deadline costs only broken hosts.
PROBE_DEADLINE_SECONDS = 15.0
KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True, slots=True)
class Verdict:
    accel: Accel
    reason: str


class AccelResolver:
    """Resolves `auto` once (probing if needed); `kvm` and `tcg` pass through unchanged."""

    def __init__(self, *, images_dir: Path, cache_file: Path, kvm_device: Path = KVM_DEVICE) -> None:
        self._images_dir = images_dir
        self._cache_file = cache_file
        self._kvm_device = kvm_device
        self._verdict: Verdict | None = None
        self._lock = asyncio.Lock()

    async def resolve(self, requested: Accel) -> Accel:
        if requested is not Accel.AUTO:
            return requested
        return (await self.verdict()).accel

    async def verdict(self) -> Verdict:
        async with self._lock:
            if self._verdict is None:
                self._verdict = self._cached() or await self._probe()
                self._remember(self._verdict)
                log.info("accel_resolved", accel=self._verdict.accel.value, reason=self._verdict.reason)
            return self._verdict

    async def _probe(self) -> Verdict:
        if not os.access(self._kvm_device, os.R_OK | os.W_OK):
            return Verdict(Accel.TCG, f"{self._kvm_device} is not accessible")
        kernel, initrd = self._images_dir / PROBE_KERNEL, self._images_dir / PROBE_INITRD
        if not (kernel.is_file() and initrd.is_file()):
            return Verdict(Accel.TCG, f"no probe guest in the images dir ({PROBE_KERNEL}); KVM unproven")
        booted, detail = await boot_reaches_marker(kernel, initrd, accel=Accel.KVM)
        if booted:
            return Verdict(Accel.KVM, f"a guest booted under KVM {detail}")
        return Verdict(Accel.TCG, f"KVM failed the boot probe: {detail}")

    def _cached(self) -> Verdict | None:
        try:
            data = json.loads(self._cache_file.read_text())
            if data["hostKernel"] != platform.release():
                return None
            return Verdict(Accel(data["accel"]), data["reason"] + " (remembered)")
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def _remember(self, verdict: Verdict) -> None:
        record = {
            "accel": verdict.accel.value,
            "reason": verdict.reason.removesuffix(" (remembered)"),
            "hostKernel": platform.release(),
            "probedAt": datetime.now().astimezone().isoformat(),
        }
        with contextlib.suppress(OSError):
            self._cache_file.parent.mkdir(parents=True, exist_ok=True)
            self._cache_file.write_text(json.dumps(record))


async def boot_reaches_marker(
    kernel: Path, initrd: Path, *, accel: Accel, deadline: float = PROBE_DEADLINE_SECONDS
) -> tuple[bool, str]:
    """Boot the tiny guest with `accel`; True if its serial console shows the ready marker in time."""
    with tempfile.TemporaryDirectory(prefix="tofu-qemu-probe-") as scratch:
        serial = Path(scratch) / "serial.log"
        argv = [
            QEMU_BINARY, "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "q35", "-accel", accel.value, "-cpu", "max" if accel is Accel.TCG else "host",
            "-m", "256", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 tofu.name=accel-probe",
            "-serial", f"file:{serial}", "-no-reboot",
            # The guest's init waits for a NIC before it prints its marker.
            "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
        ]  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            while loop.time() - started < deadline:
                if serial.exists() and READY_MARKER in serial.read_bytes():
                    return True, f"in {loop.time() - started:.1f} s"
                if process.returncode is not None:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await process.wait()
            if process.returncode is not None:
                assert process.stderr is not None
                stderr = (await process.stderr.read()).decode(errors="replace").strip()
                return False, f"QEMU exited {process.returncode}: {stderr[-300:]}"
            return False, f"no ready marker within {deadline:.0f} s"
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
