"""The tiny guest mounts a cloud-init NoCloud seed CD-ROM and serves its files byte for byte.

The seed is written by the controller's own code (seed_files + write_seed_iso) and attached on
q35 as a SCSI CD-ROM on a virtio-scsi controller: the Debian cloud kernel has no AHCI driver, so
q35's built-in ICH9 IDE/AHCI bus cannot carry it (docs/guest.md). TCG only, as in
test_guest_boot.py, whose fixtures and helpers this reuses.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from api.types import CloudInitSpec
from controller.cloudinit import seed_files
from controller.resources.seed import write_seed_iso
from tests.e2e import test_guest_boot
from tests.e2e.test_guest_boot import (
    HTTP_TIMEOUT,
    Guest,
    GuestImage,
    free_port,
    print_to_terminal,
    qemu_argv,
    spawn_qemu,
)

pytestmark = pytest.mark.e2e
# test_guest_boot's module-scoped fixture (QEMU installed, guest built), visible here under its name.
guest_image = test_guest_boot.guest_image

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


def seed_drive_args(iso: Path) -> list[str]:
    """The seed as a read-only SCSI CD-ROM on its own virtio-scsi controller (q35)."""
    blockdev = f"driver=raw,node-name=cidata,read-only=on,file.driver=file,file.filename={iso}"
    return [
        "-blockdev", blockdev,
        "-device", "virtio-scsi-pci,id=seed-scsi",
        "-device", "scsi-cd,drive=cidata,bus=seed-scsi.0",
    ]  # fmt: skip


LaunchWithSeed = Callable[[str, Path | None], Guest]


@pytest.fixture
def launch_with_seed(
    request: pytest.FixtureRequest, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LaunchWithSeed]:
    """`launch_with_seed(name, iso)` boots the initramfs guest, with the ISO as a CD-ROM unless it
    is None; every guest is killed on teardown and its logs printed if the test failed."""
    guests: list[Guest] = []
    failed_before = request.session.testsfailed

    def launch(name: str, iso: Path | None) -> Guest:
        workdir = tmp_path_factory.mktemp("vm")  # short: a unix socket path must fit in 108 bytes
        for _attempt in range(5):
            port = free_port()
            argv = qemu_argv(guest_image, workdir, name=name, port=port, disk="initramfs")
            if iso is not None:
                argv = [*argv[:-2], *seed_drive_args(iso), *argv[-2:]]  # before the final -append
            spawned = spawn_qemu(argv, workdir)
            if spawned is not None:
                guests.append(
                    Guest(name=name, process=spawned[0], workdir=workdir, port=port, qmp=spawned[1])
                )
                return guests[-1]
        raise AssertionError("no free loopback port for the HTTP forward after 5 tries")

    try:
        yield launch
    finally:
        for guest in guests:
            guest.kill()
        if request.session.testsfailed > failed_before:
            print_to_terminal(request, "\n\n".join(g.diagnostics() for g in guests))


def get_bytes(guest: Guest, path: str) -> tuple[int, bytes]:
    """One GET returning the raw body (Guest.get decodes it); call after the guest answered once."""
    conn = http.client.HTTPConnection("127.0.0.1", guest.port, timeout=HTTP_TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_guest_serves_the_seed_files_byte_exact(launch_with_seed: LaunchWithSeed, tmp_path: Path) -> None:
    """GET /cidata/user-data returns exactly the seed's bytes; meta-data names the instance and host."""
    spec = CloudInitSpec.model_validate({"userData": USER_DATA, "sshAuthorizedKeys": [SSH_KEY]})
    files = seed_files(spec, uid=UID, name="vm-seed")
    write_seed_iso(tmp_path / "cidata.iso", files)
    guest = launch_with_seed("vm-seed", tmp_path / "cidata.iso")
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


def test_guest_without_a_seed_serves_no_cidata(launch_with_seed: LaunchWithSeed) -> None:
    """With no CD-ROM the guest boots as before: its page is served and /cidata/ does not exist."""
    guest = launch_with_seed("vm-plain", None)
    guest.wait_ready()

    status, body = guest.get("/")

    assert status == 200
    assert "<h1>vm-plain</h1>" in body
    assert get_bytes(guest, "/cidata/user-data")[0] == 404
