"""Shared parts of the controller benchmarks hack/bench/{converge,recover,idle}.

What every benchmark here needs, in one place:
- a workspace (a temporary dir) that owns everything started in it and, on any exit (normal,
  error, Ctrl-C or SIGTERM), stops the server, kills every QEMU whose command line names the
  workspace and removes the dir (unless --keep);
- the server under test: `python -m controller.cli serve` with JSON logs in a file, and a
  reader that turns the log into events with epoch timestamps. The log is how the benchmarks
  see what the controller did and when, without polling the API (which would load the
  server they measure);
- the "bare" baseline: a QEMU spawned from the same argv the controller used (its launch
  record), watched through a pidfd, connected over QMP and continued, with nothing else;
- /proc readings: CPU seconds, precise on-CPU nanoseconds (schedstat), RSS, machine busy time.

Timestamps: the server stamps its log in UTC with microseconds (structlog TimeStamper), and the
benchmarks read `time.time()` on the same machine, so differences between the two are valid.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"


def _reexec_in_venv() -> None:
    """The scripts start with `#!/usr/bin/env python3`; they need the project's virtualenv."""
    if sys.prefix == sys.base_prefix and VENV_PYTHON.exists() and os.environ.get("TQB_REEXEC") != "1":
        os.environ["TQB_REEXEC"] = "1"
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])  # noqa: S606 - same script, same args


_reexec_in_venv()
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from controller.layout import DataLayout  # noqa: E402
from controller.settings import ControllerSettings  # noqa: E402

USER, PASSWORD = "bench", "bench"
GUEST_READY_MARKER = b"TOFU-GUEST-READY"
SERVER_READY_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 15.0
# On the way out the server's drain is not worth waiting for: its VMs are killed anyway.
CLEANUP_STOP_GRACE_S = 3.0
HTTP_TIMEOUT_S = 30.0
QMP_CONNECT_TIMEOUT_S = 10.0
# N QEMUs spawned at once share the CPUs while they start: the bare baseline's QMP window grows
# by this much per QEMU (N = 200: 10 + 40 = 50 s), so a large N measures rather than times out.
QMP_CONNECT_PER_VM_S = 0.2
QMP_COMMAND_TIMEOUT_S = 5.0
# The bare baseline retries a QMP connect this often (the socket appears ~25 ms after spawn).
KILL_WAIT_S = 10.0
LOG_POLL_S = 0.01
# Host ports for forwards the benchmark VMs never ask for; a range the other benchmarks avoid.
PORT_RANGE = "41000-41999"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(RuntimeError):
    """The benchmark could not measure what it set out to (a dead server, a VM that never ran)."""


def qmp_connect_window(count: int) -> float:
    """Seconds a bare QEMU, one of `count` spawned together, may take to answer QMP."""
    return QMP_CONNECT_TIMEOUT_S + QMP_CONNECT_PER_VM_S * count


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def interrupt_on_signals() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt, so the workspace always cleans up.

    SIGINT is set explicitly because a shell starts background jobs with it ignored, and a
    benchmark that owns 50 VMs must not survive its Ctrl-C or kill.
    """

    def handler(signum: int, frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# --------------------------------------------------------------------------------------------
# Specs and the guest image


def guest_spec(*, memory_mib: int) -> dict[str, Any]:
    """The benchmark VM: the tiny guest on q35/TCG with no forwards and no disks.

    stopTimeout 0 makes a delete go straight from the power button to `quit`, so tearing down
    guests that have not booted yet (and so ignore ACPI) takes milliseconds, not 30 s.
    """
    return {
        "memory": memory_mib,
        "machine": "q35",
        "accel": "tcg",
        "stopTimeout": 0,
        "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"},
    }


def install_guest(images_dir: Path) -> None:
    """Build (or reuse from the cache) the tiny guest and install it as images_dir/tiny-guest/."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hack" / "build-guest"), "--images-dir", str(images_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"hack/build-guest failed ({done.returncode}):\n{done.stderr[-3000:]}")
    progress(f"tiny guest installed in {images_dir} ({time.monotonic() - started:.1f} s)")


def is_guest_ready(serial_log: Path) -> bool:
    try:
        return GUEST_READY_MARKER in serial_log.read_bytes()
    except FileNotFoundError:
        return False


def wait_guests_ready(serial_logs: Sequence[Path], *, timeout: float) -> tuple[int, float]:
    """Wait until every serial log shows the ready marker, or the timeout. Returns (ready, seconds)."""
    started = time.monotonic()
    pending = list(serial_logs)
    while pending and time.monotonic() - started < timeout:
        pending = [path for path in pending if not is_guest_ready(path)]
        if pending:
            time.sleep(0.25)
    return len(serial_logs) - len(pending), time.monotonic() - started


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def basic_auth() -> str:
    return "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def http_request(
    method: str, url: str, body: bytes | None, *, authorization: str | None, timeout: float
) -> tuple[int, bytes]:
    """One request, past any proxy; any status is an answer (a JSON body when there is one).

    :raise OSError: no answer (transport, timeout).
    """
    headers = {"Authorization": authorization} if authorization else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    # The caller's URL: its own loopback server, or the operator's --server.
    request = urllib.request.Request(url, data=body, method=method, headers=headers)  # noqa: S310
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


def project_vms(
    request: Callable[[str, str], tuple[int, bytes]], project: str, error: type[Exception]
) -> list[dict[str, Any]]:
    """The project's VM objects through `request(method, path)`.

    :raise OSError: no answer. :raise error: an error status.
    """
    status, answer = request("GET", f"/api/v1/projects/{project}/vms")
    if status != 200:
        raise error(f"GET the VMs of {project}: {status} {answer[:300]!r}")
    items: list[dict[str, Any]] = json.loads(answer)["items"]
    return items


def server_layout(data_dir: Path) -> DataLayout:
    """The layout of a server started here: its environment carries no TOFU_QEMU_* setting
    (`Server.start`), so every path is the controller's default for `data_dir`. The run and disks
    roots depend on `data_dir` alone, so they hold for any host's data dir."""
    settings = ControllerSettings.model_construct(data_dir=data_dir)
    return DataLayout(settings.data_dir, settings.resolved_images_dir)


# Figures and reports


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def machine_info() -> dict[str, Any]:
    binary = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    qemu = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return {
        "cpus": os.cpu_count(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "qemu": qemu.stdout.splitlines()[0] if qemu.stdout else "unknown",
        "python": sys.version.split()[0],
    }


def write_json(path: Path | None, document: Mapping[str, Any]) -> None:
    if path is None:
        return
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    progress(f"wrote {path}")
