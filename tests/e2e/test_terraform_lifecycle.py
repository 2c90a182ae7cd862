"""Terraform 1.11 against a real server: apply, change, destroy, state pull/push, auth, bad specs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MakeTerraform
from tests.e2e.harness import USER, ServerProcess, condition, copy_example, write_config

pytestmark = pytest.mark.e2e

VM_POOL = """
module "pool" {
  source = "../tofu/modules/qemu-vm"
  count  = 2

  name   = "pool-${count.index}"
  memory = "256Mi"
  kernel = "tiny-guest/vmlinuz"
}
"""

# Written without the module, so its plan-time validation cannot catch memory = 8.
INVALID_VM = """
resource "terraform_data" "vm" {
  input = {
    apiVersion = "tofu-qemu.dev/v1alpha1"
    kind       = "QemuVM"
    metadata   = { name = "tiny" }
    spec = {
      memory = 8
      boot   = { kernel = "tiny-guest/vmlinuz" }
    }
  }
}
"""


def test_generation_follows_spec_changes(
    server: ServerProcess, project: str, make_terraform: MakeTerraform, tmp_path: Path
) -> None:
    """Applying the quickstart creates `hello` at generation 1; a memory change: 2; a no-op apply keeps 2."""
    tf = make_terraform(copy_example("quickstart", tmp_path))
    tf.run("init")

    tf.run("apply", "-auto-approve")
    created = server.vm(project, "hello")
    assert created["metadata"]["generation"] == 1
    assert condition(created, "Valid")["status"] == "True"
    assert created["spec"]["memory"] == 256

    tf.run("apply", "-auto-approve", "-var", "memory=512")
    changed = server.vm(project, "hello")
    assert changed["metadata"]["generation"] == 2
    assert changed["spec"]["memory"] == 512

    no_op = tf.run("apply", "-auto-approve", "-var", "memory=512")
    assert "0 added, 0 changed, 0 destroyed" in no_op.stdout
    assert server.vm(project, "hello")["metadata"]["generation"] == 2


def test_destroy_marks_every_vm_for_deletion(
    server: ServerProcess, project: str, make_terraform: MakeTerraform, tmp_path: Path
) -> None:
    """`terraform destroy` leaves every VM of the project with a deletionTimestamp."""
    tf = make_terraform(write_config(tmp_path, VM_POOL))
    tf.run("init")
    tf.run("apply", "-auto-approve")
    assert server.project(project)["vmCount"] == 2

    tf.run("destroy", "-auto-approve")

    vms = server.get_json(f"/api/v1/projects/{project}/vms")["items"]
    assert sorted(vm["metadata"]["name"] for vm in vms) == ["pool-0", "pool-1"]
    assert all(vm["metadata"]["deletionTimestamp"] for vm in vms), vms
    assert server.project(project)["vmCount"] == 0


def test_state_pull_returns_the_stored_state(
    server: ServerProcess, project: str, make_terraform: MakeTerraform, tmp_path: Path
) -> None:
    """`terraform state pull` prints the stored state, with the serial and lineage the API reports."""
    tf = make_terraform(copy_example("quickstart", tmp_path))
    tf.run("init")
    tf.run("apply", "-auto-approve")

    pulled = json.loads(tf.run("state", "pull").stdout)

    info = server.project(project)
    assert (pulled["serial"], pulled["lineage"]) == (info["serial"], info["lineage"])
    assert _without_check_order(pulled) == _without_check_order(server.get_json(f"/state/{project}"))


def _without_check_order(state: dict[str, Any]) -> dict[str, Any]:
    """Terraform 1.11 writes `check_results` in a different order on every serialisation."""
    checks = sorted(state.get("check_results") or [], key=lambda check: str(check["config_addr"]))
    return {**state, "check_results": checks}


def test_state_push_stores_a_new_version(
    server: ServerProcess, project: str, make_terraform: MakeTerraform, tmp_path: Path
) -> None:
    """`terraform state push` of a pulled state with serial+1 is accepted and listed as a new version."""
    tf = make_terraform(copy_example("quickstart", tmp_path))
    tf.run("init")
    tf.run("apply", "-auto-approve")
    pulled = json.loads(tf.run("state", "pull").stdout)
    before = server.get_json(f"/api/v1/projects/{project}/states")["items"]
    pulled["serial"] += 1
    pulled["outputs"]["pushed"] = {"value": "by state push", "type": "string"}
    pushed_file = tmp_path / "pushed.tfstate"
    pushed_file.write_text(json.dumps(pulled, indent=2) + "\n", encoding="utf-8")

    tf.run("state", "push", str(pushed_file))

    after = server.get_json(f"/api/v1/projects/{project}/states")["items"]
    assert len(after) == len(before) + 1
    newest = after[0]
    assert newest["serial"] >= pulled["serial"]
    assert newest["lineage"] == pulled["lineage"]
    assert newest["operation"] == "state-push"
    stored = server.get_json(f"/state/{project}")
    assert stored["serial"] == newest["serial"]
    assert stored["outputs"]["pushed"]["value"] == "by state push"


def test_wrong_password_is_refused(
    server: ServerProcess, project: str, make_terraform: MakeTerraform, tmp_path: Path
) -> None:
    """A wrong password gets 401, which Terraform reports as "requires auth"."""
    tf = make_terraform(copy_example("quickstart", tmp_path), password="not-the-password")

    result = tf.run("init", check=False)

    assert result.returncode != 0
    assert "HTTP remote state endpoint requires auth" in result.output, result.describe()
    assert server.request("GET", f"/state/{project}", auth=(USER, "not-the-password")).status == 401


def test_invalid_spec_is_stored_with_valid_false(
    server: ServerProcess, project: str, make_terraform: MakeTerraform, tmp_path: Path
) -> None:
    """An invalid manifest does not fail the apply; its VM shows Valid=False naming spec.memory."""
    tf = make_terraform(write_config(tmp_path, INVALID_VM))
    tf.run("init")

    tf.run("apply", "-auto-approve")

    vm = server.vm(project, "tiny")
    valid = condition(vm, "Valid")
    assert valid["status"] == "False"
    assert "spec.memory" in valid["message"]
    assert vm["status"]["phase"] == "Invalid"
