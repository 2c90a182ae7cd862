"""hack/chaos at CI size: the tool users run, run here exactly as they would (`--spawn`).

5 VMs (the tiny guest on TCG, each with a forwarded port and a disk), SIGKILL of a random
Running QEMU every 2 s for 30 s, and 3 SIGKILLs of the controller (split mode), each restarted
after up to 2 s. Repeated kills of one VM meet the crash-loop backoff (1 s, 2 s, 4 s ...), well
inside the tool's 60 s per-fault recovery timeout even while guests boot on 2 busy cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import REPO_ROOT, kill_qemus

pytestmark = pytest.mark.e2e

# A run takes about 45 s: start-up, 30 s of chaos, settling, deleting, the leak checks.
CHAOS_TIMEOUT = 240.0
CLEANUP_TIMEOUT = 30.0
OUTPUT_TAIL_CHARS = 8000


def run_chaos(argv: list[str], *, tmpdir: Path) -> tuple[int, str]:
    """Run hack/chaos with its workspace under `tmpdir`; return (exit code, its output).

    On a timeout it gets SIGTERM, on which it kills everything it started; whatever QEMU of
    `tmpdir` is left is killed here anyway.
    """
    env = os.environ | {"TMPDIR": str(tmpdir)}
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "hack" / "chaos"), *argv],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=CHAOS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=CLEANUP_TIMEOUT)
        pytest.fail(f"hack/chaos did not finish within {CHAOS_TIMEOUT:.0f} s:\n{output[-OUTPUT_TAIL_CHARS:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        kill_qemus(tmpdir)
    return process.returncode, output


def chaos_report(tmp_path: Path, guest_images: Path, *options: str) -> tuple[dict[str, Any], str]:
    """Run `hack/chaos --spawn` with `options`; its JSON report, and context for failure messages.

    :raise AssertionError: the tool exited non-zero (its verdict, or a run it could not make).
    """
    report_path = tmp_path / "chaos.json"
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    argv = ["--spawn", *options, "--images-dir", str(guest_images), "--json", str(report_path)]
    code, output = run_chaos(argv, tmpdir=workspace)
    context = f"hack/chaos exited {code} (workspace kept under {workspace}):\n{output[-OUTPUT_TAIL_CHARS:]}"
    assert code == 0, context
    report: dict[str, Any] = json.loads(report_path.read_text())
    return report, context


def test_chaos_kills_of_qemu_and_controller_all_recover_without_leaks(
    tmp_path: Path, guest_images: Path
) -> None:
    """Every VM recovers from QEMU and controller SIGKILLs, with no leak, no duplicate and an intact store."""
    report, context = chaos_report(
        tmp_path, guest_images, "--vms", "5", "--duration", "30", "--interval", "2", "--controller-kills", "3"
    )
    summary = report["summary"]
    figures = {key: summary[key] for key in ("kills", "recovered", "unrecovered", "leaks", "duplicates")}
    assert summary["kills"] > 0, context
    assert figures == {
        "kills": summary["kills"],
        "recovered": summary["kills"],
        "unrecovered": 0,
        "leaks": 0,
        "duplicates": 0,
    }, context
    assert (summary["controller_kills"], summary["controller_restarts"]) == (3, 3), context
    assert summary["vms_not_running"] == 0, context
    assert summary["store_intact"] is True, context
    assert report["checks"]["after_delete"]["leaks"] == 0, context


def test_chaos_runtime_dir_and_socket_removal_all_recover_without_leaks(
    tmp_path: Path, guest_images: Path
) -> None:
    """A VM whose runtime dir or QMP socket is removed under it is replaced; nothing leaks."""
    report, context = chaos_report(
        tmp_path,
        guest_images,
        "--vms",
        "3",
        "--duration",
        "12",
        "--interval",
        "3",
        "--faults",
        "rmdir,rmsock",
    )
    summary = report["summary"]
    assert summary["kills"] > 0, context
    outcome = (summary["recovered"], summary["leaks"], summary["duplicates"])
    assert outcome == (summary["kills"], 0, 0), context
