"""Instance types end to end (docs/instancetypes.md): real Terraform declares a QemuInstanceType
and a VM sized by it through the modules, real QEMU runs it on TCG. A change of the type marks
the VM InstanceTypeOutdated and restarts nothing (same pid, same `-m`); `tofu-qemu rollout`
moves it to the new size. Beside it, a VM that sets what its type sets and one whose type does
not exist are Valid=False, and the state is accepted all the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import MakeTerraform, MakeVmHost
from tests.e2e.harness import condition, is_running_current, memory_argument, terraform_for, write_config
from tests.e2e.test_cli import Cli

pytestmark = pytest.mark.e2e

PROJECT = "sized"
CONFIG = """
variable "memory" {
  type = number
}

module "small" {
  source = "../tofu/modules/qemu-instancetype"
  name   = "small"
  spec   = { cpus = 1, memory = var.memory }
}

module "linux" {
  source = "../tofu/modules/qemu-instancetype"
  name   = "linux"
  kind   = "QemuPreference"
  spec   = { accel = "tcg", stopTimeout = 10 }
}

module "vm" {
  source        = "../tofu/modules/qemu-vm"
  name          = "typed"
  kernel        = "tiny-guest/vmlinuz"
  initrd        = "tiny-guest/initramfs.cpio.gz"
  instance_type = { name = module.small.name }
  preference    = { name = module.linux.name }
}

# Raw manifests: the module itself refuses these at plan time.
resource "terraform_data" "conflicting" {
  input = {
    apiVersion = "tofu-qemu.dev/v1alpha1"
    kind       = "QemuVM"
    metadata   = { name = "conflicting" }
    spec = {
      cpus         = 2
      instanceType = { name = "small" }
      boot         = { kernel = "tiny-guest/vmlinuz" }
    }
  }
}

resource "terraform_data" "lost" {
  input = {
    apiVersion = "tofu-qemu.dev/v1alpha1"
    kind       = "QemuVM"
    metadata   = { name = "lost" }
    spec = {
      instanceType = { name = "huge" }
      boot         = { kernel = "tiny-guest/vmlinuz" }
    }
  }
}
"""


def _outdated(vm: dict[str, object]) -> str | None:
    found = [c for c in vm["status"]["conditions"] if c["type"] == "InstanceTypeOutdated"]  # type: ignore[index]
    return found[0]["status"] if found else None


def test_a_type_sizes_the_vm_a_change_waits_for_a_rollout(
    make_vm_host: MakeVmHost, terraform_bin: str
) -> None:
    host = make_vm_host()
    server = host.start("serve")
    workdir = write_config(host.root / "config", CONFIG)
    terraform = terraform_for(
        terraform_bin, workdir, state_url=host.state_url(PROJECT), scratch=host.root / "tf-scratch"
    )
    terraform.run("init")
    tfvars = workdir / "terraform.tfvars.json"
    tfvars.write_text(json.dumps({"memory": 192}), encoding="utf-8")
    terraform.run("apply", "-auto-approve")

    first = host.wait_vm(PROJECT, "typed", is_running_current, what="Running at the type's size")
    pid = first["status"]["pid"]
    assert memory_argument(pid) == "192M"
    assert "cpus" not in first["spec"], "the VM's own spec stays as written"
    assert "memory" not in first["spec"]
    taken = first["status"]["instanceType"]
    assert (taken["kind"], taken["name"], taken["spec"]) == (
        "QemuInstanceType",
        "small",
        {"cpus": 1, "memory": 192},
    )
    assert first["status"]["preference"]["spec"] == {"accel": "tcg", "stopTimeout": 10}
    assert _outdated(first) == "False"

    conflicting = host.wait_vm(
        PROJECT, "conflicting", lambda vm: vm["status"]["phase"] == "Invalid", what="Invalid"
    )
    assert "spec.cpus: set by QemuInstanceType 'small'" in condition(conflicting, "Valid")["message"]
    lost = host.wait_vm(PROJECT, "lost", lambda vm: vm["status"]["phase"] == "Invalid", what="Invalid")
    assert "QemuInstanceType 'huge' not found in project 'sized'" in condition(lost, "Valid")["message"]

    # The type grows: the VM is told, and keeps running the revision it took.
    tfvars.write_text(json.dumps({"memory": 256}), encoding="utf-8")
    terraform.run("apply", "-auto-approve")
    outdated = host.wait_vm(PROJECT, "typed", lambda vm: _outdated(vm) == "True", what="InstanceTypeOutdated")
    assert outdated["status"]["pid"] == pid
    assert outdated["status"]["restarts"] == 0
    assert outdated["metadata"]["generation"] == first["metadata"]["generation"]
    assert memory_argument(pid) == "192M"
    assert "tofu-qemu rollout" in condition(outdated, "InstanceTypeOutdated")["message"]

    cli = Cli(server)
    listed = cli.run("get", "instancetypes", "-p", PROJECT)
    assert any(line.split()[:4] == [PROJECT, "small", "1", "256Mi"] for line in listed.splitlines()), listed
    assert any(line.split()[:4] == ["<cluster>", "u1.small", "1", "512Mi"] for line in listed.splitlines()), (
        listed
    )
    assert "accel,stopTimeout" in cli.run("get", "preferences", "-p", PROJECT)

    assert "rollout requested" in cli.run("rollout", "vm", "typed", "-p", PROJECT)
    rolled = host.wait_vm(
        PROJECT,
        "typed",
        lambda vm: is_running_current(vm) and vm["status"]["pid"] != pid and _outdated(vm) == "False",
        what="restarted at the new size",
    )
    assert memory_argument(rolled["status"]["pid"]) == "256M"
    assert rolled["status"]["instanceType"]["spec"] == {"cpus": 1, "memory": 256}
    events = server.get_json(f"/apis/tofu-qemu.dev/v1alpha1/projects/{PROJECT}/qemuvms/typed/events")["items"]
    reasons = [event["reason"] for event in events]
    assert reasons.count("RevisionTaken") == 3, reasons  # the type and the preference, then the new type
    last_start = len(reasons) - 1 - reasons[::-1].index("Started")
    assert reasons.index("InstanceTypeOutdated") < reasons.index("RolloutRequested") < last_start, reasons


MODULE_MISTAKES = """
module "sized" {
  source        = "../tofu/modules/qemu-vm"
  name          = "sized"
  kernel        = "tiny-guest/vmlinuz"
  cpus          = 2
  instance_type = { name = "small" }
}

module "half" {
  source = "../tofu/modules/qemu-instancetype"
  name   = "half"
  spec   = { cpus = 1 }
}
"""


def test_the_modules_refuse_at_plan_what_the_server_would_mark_invalid(
    make_terraform: MakeTerraform, tmp_path: Path
) -> None:
    terraform = make_terraform(write_config(tmp_path / "config", MODULE_MISTAKES))
    terraform.run("init")
    plan = terraform.run("plan", check=False)
    assert plan.returncode != 0
    output = " ".join((plan.stdout + plan.stderr).split())
    assert "A VM with an instance_type may not set cpus or memory" in output
    assert "A QemuInstanceType sets both cpus and memory" in output
