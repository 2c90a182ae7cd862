"""The tiny guest mounts a cloud-init NoCloud seed CD-ROM and serves its files byte for byte.

The seed is written by the controller's own code (seed_files + write_seed_iso) and attached on
q35 as a SCSI CD-ROM on a virtio-scsi controller: the Debian cloud kernel has no AHCI driver, so
q35's built-in ICH9 IDE/AHCI bus cannot carry it (docs/guest.md). TCG only, as in
test_guest_boot.py, whose fixtures and helpers this reuses.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from api.types import CloudInitSpec, Machine
from controller.cloudinit import seed_files
from controller.qemu.argv import seed_drive
from controller.resources.seed import write_seed_iso
from tests.e2e import test_guest_boot
from tests.e2e.test_guest_boot import HTTP_TIMEOUT, Guest, Launch

pytestmark = pytest.mark.e2e
# test_guest_boot's fixtures (QEMU installed, guest built; guests launched and killed), visible
# here under their names.
guest_image = test_guest_boot.guest_image
launch = test_guest_boot.launch

UID = "0f7d3c2a-9b1e-4c6d-8a5f-3e2d1c0b9a87"
# Odd on purpose: UTF-8, CRLF, tabs, quotes, backslashes, a YAML-looking line, no final newline.
USER_DATA = (
    "#!/bin/sh\n"
    "# héllo wörld ✓ — 日本語\r\n"
    "echo \"$HOME\" 'single' `tick` \\back\\slash\ttab\n"
    "key: [not, yaml, here]\n"
    "\n"
    "--- no final newline"
)
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyExampleKeyExampleKeyExampleKey e2e@test"


def get_bytes(guest: Guest, path: str) -> tuple[int, bytes]:
    """One GET returning the raw body (Guest.get decodes it); call after the guest answered once."""
    conn = http.client.HTTPConnection("127.0.0.1", guest.port, timeout=HTTP_TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_guest_serves_the_seed_files_byte_exact(launch: Launch, tmp_path: Path) -> None:
    """GET /cidata/user-data returns exactly the seed's bytes; meta-data names the instance and host."""
    spec = CloudInitSpec.model_validate({"userData": USER_DATA, "sshAuthorizedKeys": [SSH_KEY]})
    files = seed_files(spec, uid=UID, name="vm-seed")
    write_seed_iso(tmp_path / "cidata.iso", files)
    # The controller's own arguments for the seed drive.
    guest = launch("vm-seed", extra_args=seed_drive(Machine.Q35, tmp_path / "cidata.iso"))
    guest.wait_ready()
    guest.get("/")  # retries until the guest's httpd really answers

    user_data = get_bytes(guest, "/cidata/user-data")
    meta_data = get_bytes(guest, "/cidata/meta-data")

    assert user_data == (200, USER_DATA.encode())
    assert meta_data == (200, files["meta-data"])
    meta = json.loads(meta_data[1])
    assert meta["instance-id"].startswith("i-0f7d3c2a-")
    assert meta["local-hostname"] == "vm-seed"
    assert meta["public-keys"] == [SSH_KEY]
