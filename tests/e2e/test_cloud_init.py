"""cloud-init end to end: Terraform declares a VM with `cloud_init` through the qemu-vm module,
the controller writes the NoCloud seed and attaches it as a CD-ROM, and the tiny guest mounts it
and serves its files over HTTP, so the test reads back what the guest really received."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    GUEST_BOOT_TIMEOUT,
    VmHost,
    get_guest_page,
    host_port,
    is_running_current,
    terraform_for,
    write_config,
)

pytestmark = pytest.mark.e2e

PROJECT = "cloudinit"
# Odd characters on purpose: quotes, a backslash, a tab, non-ASCII and no final newline; the
# guest must receive exactly these bytes.
USER_DATA_ONE = '#!/bin/sh\necho "hello from tofu-qemu" > /tmp/x\t# tab, back\\slash, ünïcödé'
USER_DATA_TWO = {"packages": ["nginx"], "runcmd": [["echo", "second"]]}
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKzu5tZ0YxkN7k3Qd2m5x4w0r8B1s0Jv8d9yY2yqW0aP me@laptop"
CONFIG = """
variable "user_data" {
  type = any
}

module "vm" {
  source = "../tofu/modules/qemu-vm"

  name         = "seeded"
  memory       = 256
  accel        = "tcg"
  kernel       = "tiny-guest/vmlinuz"
  initrd       = "tiny-guest/initramfs.cpio.gz"
  forwards     = [{ guest_port = 80 }]
  stop_timeout = 10
  cloud_init = {
    user_data           = var.user_data
    meta_data           = { "zone" = "lab-1" }
    ssh_authorized_keys = ["SSH_KEY"]
  }
}
""".replace("SSH_KEY", KEY)


def guest_file(vm: dict[str, Any], name: str) -> bytes:
    status, body = get_guest_page(host_port(vm), f"/cidata/{name}", timeout=GUEST_BOOT_TIMEOUT)
    assert status == 200, f"/cidata/{name}: {status} {body[:300]!r}"
    return body.encode()


def seeds(host: VmHost, vm: dict[str, Any]) -> list[Path]:
    return sorted((host.data_dir / "run" / vm["metadata"]["uid"]).glob("cidata-*.iso"))


def test_the_guest_receives_exactly_the_user_data_of_the_spec(
    make_vm_host: MakeVmHost, terraform_bin: str
) -> None:
    host = make_vm_host()
    host.start("serve")
    workdir = write_config(host.root / "config", CONFIG)
    terraform = terraform_for(
        terraform_bin, workdir, state_url=host.state_url(PROJECT), scratch=host.root / "tf-scratch"
    )
    terraform.run("init")
    # A .tfvars.json keeps the JSON types: an object stays an object for `type = any`.
    tfvars = workdir / "terraform.tfvars.json"
    tfvars.write_text(json.dumps({"user_data": USER_DATA_ONE}), encoding="utf-8")
    terraform.run("apply", "-auto-approve")

    first = host.wait_vm(PROJECT, "seeded", is_running_current, what="Running")
    assert guest_file(first, "user-data") == USER_DATA_ONE.encode()
    meta = json.loads(guest_file(first, "meta-data"))
    assert meta["local-hostname"] == "seeded"
    assert meta["public-keys"] == [KEY]
    assert meta["zone"] == "lab-1"
    assert meta["instance-id"].startswith("i-" + first["metadata"]["uid"].replace("-", "")[:8])
    [first_seed] = seeds(host, first)

    # A change of the cloud-init config restarts the VM with a new seed and a new instance-id.
    tfvars.write_text(json.dumps({"user_data": USER_DATA_TWO}), encoding="utf-8")
    terraform.run("apply", "-auto-approve")
    second = host.wait_vm(
        PROJECT,
        "seeded",
        lambda vm: is_running_current(vm) and vm["status"]["pid"] != first["status"]["pid"],
        what="restarted with the new seed",
    )
    user_data = guest_file(second, "user-data")
    assert user_data.startswith(b"#cloud-config\n")
    assert json.loads(user_data.removeprefix(b"#cloud-config\n")) == USER_DATA_TWO
    assert json.loads(guest_file(second, "meta-data"))["instance-id"] != meta["instance-id"]
    [second_seed] = seeds(host, second)
    assert second_seed != first_seed, "the old seed was removed, the new one has a new name"

    # The seed goes with the VM.
    terraform.run("destroy", "-auto-approve")
    host.wait_gone(PROJECT, "seeded")
    assert not second_seed.exists()
