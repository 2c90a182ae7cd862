"""`tofu-qemu backup` while serving, and `tofu-qemu restore` after losing the store: the state
comes back byte for byte and the VMs that kept running are adopted, not restarted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    DB_FILE_NAME,
    REPO_ROOT,
    Fleet,
    GuestVM,
    VmHost,
    running_identity,
    runs_generation,
)

pytestmark = pytest.mark.e2e

VMS = {"alpha": GuestVM(memory=128), "bravo": GuestVM(memory=128)}
CLI_TIMEOUT = 30.0


def tofu_qemu(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the `tofu-qemu` command as an operator would, with no TOFU_QEMU_* settings inherited."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TOFU_QEMU_")}
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def state_md5(host: VmHost, project: str) -> str:
    answer = host.request("GET", f"/state/{project}")
    assert answer.status == 200, answer
    return hashlib.md5(answer.body).hexdigest()  # noqa: S324 - Terraform's own state checksum


def lose_the_store(data_dir: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (data_dir / (DB_FILE_NAME + suffix)).unlink(missing_ok=True)


def test_restore_after_losing_the_store_brings_back_the_state_and_adopts_the_vms(
    make_vm_host: MakeVmHost, terraform_bin: str, project: str, tmp_path: Path
) -> None:
    """Back up while serving, stop, delete the store, restore, start: the same state md5, and the
    same QEMU processes adopted with restarts unchanged."""
    host = make_vm_host()
    host.start("serve")
    fleet = Fleet(host, terraform_bin, project=project)
    fleet.init()
    fleet.apply(VMS)
    before = {name: fleet.wait_running(name) for name in VMS}
    processes = {name: running_identity(vm["status"]["pid"]) for name, vm in before.items()}
    md5 = state_md5(host, project)
    backup_file = tmp_path / "backup.sqlite3"

    backed_up = tofu_qemu("backup", str(backup_file), "--data-dir", str(host.data_dir))
    assert backed_up.returncode == 0, backed_up.stderr
    summary = json.loads(backed_up.stdout)
    assert (summary["projects"], summary["vms"]) == (1, len(VMS)), summary
    assert summary["sha256"] == hashlib.sha256(backup_file.read_bytes()).hexdigest()
    refused = tofu_qemu("restore", str(backup_file), "--data-dir", str(host.data_dir), "--force")
    assert (refused.returncode, refused.stderr.strip()) == (
        2,
        f"tofu-qemu: a tofu-qemu process is using {host.data_dir}; stop it first",
    )

    assert host.stop("serve") == 0
    lose_the_store(host.data_dir)
    restored = tofu_qemu("restore", str(backup_file), "--data-dir", str(host.data_dir))
    assert restored.returncode == 0, restored.stderr
    assert restored.stderr == "", "every running VM is declared in the backup"
    assert json.loads(restored.stdout)["previous"] is None
    server = host.start("serve")

    assert state_md5(host, project) == md5
    # A label change proves the new controller reconciled both VMs: observedGeneration moves only
    # once it has observed the VM running the current spec.
    fleet.apply({name: GuestVM(vm.memory, labels={"restored": "yes"}) for name, vm in VMS.items()})
    for name, vm in before.items():
        generation = vm["metadata"]["generation"] + 1
        after = fleet.wait_vm(name, runs_generation(generation), what=f"observedGeneration {generation}")
        assert after["status"]["pid"] == vm["status"]["pid"], name
        assert after["status"]["restarts"] == vm["status"]["restarts"], name
    assert '"vm_spawned"' not in server.log_since_last_start()
    assert all(process.is_running for process in processes.values()), "the same QEMU processes throughout"
