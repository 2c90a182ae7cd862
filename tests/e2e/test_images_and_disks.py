"""Base images from a URL, disk growth and shrinking, retained disks and stop-on-exit, end to end:
a real server, real QEMU (TCG) and the tiny guest, whose root disk is an overlay on a base image
the controller downloaded from a loopback HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.qemu.process import read_cmdline
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    GUEST_BOOT_TIMEOUT,
    ServerProcess,
    VmHost,
    condition,
    get_guest_page,
    host_port,
    is_running_current,
)

pytestmark = pytest.mark.e2e

PROJECT = "disks"
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
KERNEL = {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"}
FORWARD = {"forwards": [{"guestPort": 80}]}
# The kernel names each virtio disk's capacity once per boot on the serial console.
_VDA_BLOCKS_RE = re.compile(r"\[vda\] (\d+) 512-byte logical blocks")


class ImageServer:
    """A loopback HTTP server for one image and its .sha256 sidecar, counting GETs by path;
    `redirects` maps a path to the Location it answers 302 with."""

    def __init__(self, image: bytes, *, host: str = "127.0.0.1") -> None:
        self.image = image
        self.digest = hashlib.sha256(image).hexdigest()
        self.gets: Counter[str] = Counter()
        self.redirects: dict[str, str] = {}
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.gets[self.path] += 1
                if self.path in owner.redirects:
                    self.send_response(302)
                    self.send_header("Location", owner.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/rootfs.raw":
                    body = owner.image
                elif self.path == "/rootfs.raw.sha256":
                    body = f"{owner.digest}  rootfs.raw\n".encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def image_server(guest_images: Path) -> Iterator[ImageServer]:
    server = ImageServer((guest_images / "tiny-guest" / "rootfs.raw").read_bytes())
    try:
        yield server
    finally:
        server.close()


# The loopback image servers stand for a local mirror, which an operator allows by network:
# image downloads refuse loopback addresses otherwise.
MIRROR_ARGS = ("--image-fetch-allow-networks", "127.0.0.1/32")


def declare(server: ServerProcess, serial: int, vms: dict[str, dict[str, Any]]) -> None:
    server.declare_vms(PROJECT, serial, vms)


def root_disk_vm(disk: dict[str, Any]) -> dict[str, Any]:
    """A guest whose root filesystem is the disk `disk`, an overlay on rootfs.raw."""
    return {
        "memory": 256,
        "accel": "tcg",
        "stopTimeout": 10,
        "boot": {**KERNEL, "cmdline": "root=/dev/vda"},
        "disks": [{"name": "root", **disk}],
        "network": FORWARD,
    }


def guest_name(vm: dict[str, Any]) -> str:
    status, body = get_guest_page(host_port(vm), "/info.txt", timeout=GUEST_BOOT_TIMEOUT)
    assert status == 200, body
    return dict(line.split("=", 1) for line in body.splitlines() if "=" in line)["name"]


def qemu_img_info(path: Path) -> dict[str, Any]:
    output = subprocess.run(
        [QEMU_IMG, "info", "-U", "--output=json", str(path)], check=True, capture_output=True, text=True
    ).stdout
    info = json.loads(output)
    assert isinstance(info, dict)
    return info


def disk_path(host: VmHost, vm: dict[str, Any], name: str) -> Path:
    rows = host.sql("SELECT path FROM disks WHERE uid = ? AND name = ?", vm["metadata"]["uid"], name)
    assert len(rows) == 1, rows
    return Path(rows[0][0])


def has_ready_reason(reason: str) -> Callable[[dict[str, Any]], bool]:
    def check(vm: dict[str, Any]) -> bool:
        ready = [c for c in vm["status"]["conditions"] if c["type"] == "Ready"]
        return bool(ready) and ready[0]["reason"] == reason

    return check


def test_vms_boot_from_a_downloaded_image_fetched_once(
    make_vm_host: MakeVmHost, image_server: ImageServer
) -> None:
    """Two VMs name one URL (one with its sha256, one reading the sidecar): one download, verified,
    cached by digest; each root disk is a qcow2 overlay on the cached file; both guests boot."""
    host = make_vm_host()
    server = host.start("serve", extra_args=MIRROR_ARGS)
    url = f"{image_server.url}/rootfs.raw"
    declare(
        server,
        1,
        {
            "pinned": root_disk_vm({"image": url, "sha256": image_server.digest, "size": "64Mi"}),
            "sidecar": root_disk_vm({"image": url}),
        },
    )
    for name in ("pinned", "sidecar"):
        vm = host.wait_vm(PROJECT, name, is_running_current, what=f"{name} Running", timeout=120)
        assert guest_name(vm) == name
    cached = host.images_dir / "sha256" / image_server.digest
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == image_server.digest
    assert image_server.gets["/rootfs.raw"] == 1
    assert image_server.gets["/rootfs.raw.sha256"] == 1
    for name, size in (("pinned", 64 * 2**20), ("sidecar", cached.stat().st_size)):
        info = qemu_img_info(disk_path(host, host.vm(PROJECT, name), "root"))
        assert (info["format"], info["backing-filename"], info["virtual-size"]) == (
            "qcow2",
            str(cached),
            size,
        )
    assert not list((host.images_dir / ".downloads").glob("*")), "no partial download is left"


def test_a_compressed_qcow2_image_stays_compressed_in_the_cache_and_boots(
    make_vm_host: MakeVmHost, guest_images: Path, tmp_path: Path
) -> None:
    """The cache keeps the file as served (no conversion): the overlay's base is the compressed
    qcow2 itself, named with -F qcow2, and the guest boots from it."""
    compressed = tmp_path / "rootfs.qcow2"
    subprocess.run(
        [
            QEMU_IMG,
            "convert",
            "-c",
            "-O",
            "qcow2",
            str(guest_images / "tiny-guest" / "rootfs.raw"),
            str(compressed),
        ],
        check=True,
        timeout=60,
    )
    image_server = ImageServer(compressed.read_bytes())
    try:
        host = make_vm_host()
        server = host.start("serve", extra_args=MIRROR_ARGS)
        declare(server, 1, {"squeezed": root_disk_vm({"image": f"{image_server.url}/rootfs.raw"})})
        vm = host.wait_vm(PROJECT, "squeezed", is_running_current, what="Running", timeout=120)
        assert guest_name(vm) == "squeezed"
        cached = host.images_dir / "sha256" / image_server.digest
        assert cached.read_bytes() == compressed.read_bytes()
        assert qemu_img_info(cached)["format"] == "qcow2"
        info = qemu_img_info(disk_path(host, vm, "root"))
        assert (info["backing-filename"], info["backing-filename-format"]) == (str(cached), "qcow2")
    finally:
        image_server.close()


def test_a_checksum_mismatch_is_a_condition_and_caches_nothing(make_vm_host: MakeVmHost) -> None:
    """Wrong digest: Ready=False reason=ImageChecksumMismatch naming the spec's digest (not the
    served file's: that would read back what a server sent), nothing cached, no disk made. The
    right digest in a new apply: downloaded, cached, the disk made on it."""
    # Bytes of this test's own: the session's images dir may cache other tests' images.
    image_server = ImageServer(os.urandom(256 * 1024))
    try:
        host = make_vm_host()
        server = host.start("serve", extra_args=MIRROR_ARGS)
        url = f"{image_server.url}/rootfs.raw"
        wrong = "0" * 64
        declare(server, 1, {"bad": root_disk_vm({"image": url, "sha256": wrong})})
        vm = host.wait_vm(PROJECT, "bad", has_ready_reason("ImageChecksumMismatch"), what="checksum mismatch")
        assert vm["status"]["phase"] == "Pending"
        message = condition(vm, "Ready")["message"]
        assert (
            message
            == f"disk 'root': {url}: the downloaded file does not match sha256 {wrong}; nothing was cached"
        )
        assert image_server.digest not in message
        cached = host.images_dir / "sha256" / image_server.digest
        assert not (host.images_dir / "sha256" / wrong).exists()
        assert not cached.exists()
        assert host.sql("SELECT name FROM disks") == []

        declare(server, 2, {"bad": root_disk_vm({"image": url, "sha256": image_server.digest})})
        host.wait_vm(PROJECT, "bad", lambda vm: bool(host.sql("SELECT name FROM disks")), what="disk made")
        assert cached.read_bytes() == image_server.image
        assert qemu_img_info(disk_path(host, host.vm(PROJECT, "bad"), "root"))["backing-filename"] == str(
            cached
        )
    finally:
        image_server.close()


def vda_blocks(host: VmHost, vm: dict[str, Any]) -> int:
    serial = host.data_dir / "run" / vm["metadata"]["uid"] / "serial.log"
    found = _VDA_BLOCKS_RE.findall(serial.read_text(encoding="utf-8", errors="replace"))
    assert len(found) == 1, found
    return int(found[0])


def data_disk_vm(size: str) -> dict[str, Any]:
    return {
        "memory": 256,
        "accel": "tcg",
        "stopTimeout": 10,
        "boot": KERNEL,
        "disks": [{"name": "data", "size": size, "reclaimPolicy": "Retain"}],
        "network": FORWARD,
    }


def retained_disks(server: ServerProcess) -> list[dict[str, Any]]:
    return [
        disk for disk in server.get_json(f"/api/v1/projects/{PROJECT}/disks")["items"] if disk["retained"]
    ]


def test_disk_growth_shrink_refusal_and_a_retained_disk_reused(make_vm_host: MakeVmHost) -> None:
    host = make_vm_host()
    server = host.start("serve")
    declare(server, 1, {"keep": data_disk_vm("64Mi")})
    first = host.wait_vm(PROJECT, "keep", is_running_current, what="Running")
    guest_name(first)
    assert vda_blocks(host, first) == 64 * 2048
    path = disk_path(host, first, "data")
    inode = path.stat().st_ino

    # Growing restarts the VM (gracefully) with the disk resized; the guest sees the new size.
    declare(server, 2, {"keep": data_disk_vm("128Mi")})
    grown = host.wait_vm(
        PROJECT,
        "keep",
        lambda vm: is_running_current(vm) and vm["status"]["pid"] != first["status"]["pid"],
        what="restarted",
    )
    guest_name(grown)
    assert vda_blocks(host, grown) == 128 * 2048
    assert qemu_img_info(path)["virtual-size"] == 128 * 2**20
    assert grown["status"]["restarts"] == 0, "a restart the controller chose is not a crash restart"

    # Shrinking is refused; the VM runs on, untouched.
    declare(server, 3, {"keep": data_disk_vm("64Mi")})
    refused = host.wait_vm(
        PROJECT,
        "keep",
        lambda vm: condition(vm, "Synced")["reason"] == "DiskShrinkRefused",
        what="shrink refused",
    )
    assert (refused["status"]["phase"], refused["status"]["pid"]) == ("Running", grown["status"]["pid"])
    assert "shrinking it to 64 MiB is refused" in condition(refused, "Synced")["message"]
    assert qemu_img_info(path)["virtual-size"] == 128 * 2**20

    # Deleted: the disk stays, listed as retained. Re-created under the same name: reused.
    declare(server, 4, {})
    host.wait_gone(PROJECT, "keep")
    assert [(d["vm"], d["name"], d["sizeMiB"]) for d in retained_disks(server)] == [("keep", "data", 128)]
    assert path.stat().st_ino == inode
    declare(server, 5, {"keep": data_disk_vm("128Mi")})
    again = host.wait_vm(PROJECT, "keep", is_running_current, what="re-created Running")
    assert again["metadata"]["uid"] != first["metadata"]["uid"]
    assert disk_path(host, again, "data") == path
    assert path.stat().st_ino == inode
    assert retained_disks(server) == []
    argv = read_cmdline(again["status"]["pid"]) or ()
    assert any(str(path) in argument for argument in argv)


def test_stop_vms_on_exit_powers_guests_down_and_the_next_start_boots_them(make_vm_host: MakeVmHost) -> None:
    """What a container's `docker stop` does: ACPI power-off, recorded as the controller's stop,
    then a normal boot on the next start (no restart or failure counted)."""
    host = make_vm_host()
    server = host.start("serve", extra_args=("--stop-vms-on-exit",))
    declare(server, 1, {"one": data_disk_vm("8Mi")})
    vm = host.wait_vm(PROJECT, "one", is_running_current, what="Running")
    guest_name(vm)
    pid = vm["status"]["pid"]
    serial = host.data_dir / "run" / vm["metadata"]["uid"] / "serial.log"

    assert host.stop() == 0
    assert not Path(f"/proc/{pid}").exists(), "QEMU was stopped with the server"
    assert b"TOFU-GUEST-POWEROFF" in serial.read_bytes(), "the guest got the ACPI power button"
    assert "vms_stopped" in server.log_since_last_start()

    host.start("serve", extra_args=("--stop-vms-on-exit",))
    again = host.wait_vm(
        PROJECT, "one", lambda v: is_running_current(v) and v["status"]["pid"] != pid, what="booted again"
    )
    guest_name(again)
    assert again["status"]["lastExit"]["reason"] == "stopped-by-controller"
    assert (again["status"]["restarts"], again["status"]["failures"]) == (0, 0)


def test_image_urls_to_internal_addresses_are_refused_and_nothing_is_read_back(
    make_vm_host: MakeVmHost, tmp_path: Path
) -> None:
    """The audit's SSRF, end to end: with only a mirror on 127.0.0.2 allowed, a URL naming the
    server's own API, a name resolving to loopback, and a mirror redirecting to an internal
    server are all refused before any connect. The internal server gets no request; no
    condition or event carries its port, its status or its contents."""
    internal = ImageServer(b"internal secret " * 64)
    mirror = ImageServer(b"mirror image", host="127.0.0.2")
    secret_url = f"{internal.url}/rootfs.raw"
    mirror.redirects["/rootfs.raw"] = secret_url
    try:
        host = make_vm_host()
        server = host.start("serve", extra_args=("--image-fetch-allow-networks", "127.0.0.2/32"))
        internal_port = internal.url.rsplit(":", 1)[1]
        urls = {
            "api": f"{server.url}/api/v1/projects/{PROJECT}/vms",
            "by-name": f"http://localhost:{internal_port}/rootfs.raw",
            "redirected": f"{mirror.url}/rootfs.raw",
        }
        declare(server, 1, {name: root_disk_vm({"image": url}) for name, url in urls.items()})
        for name, url in urls.items():
            vm = host.wait_vm(PROJECT, name, has_ready_reason("ImageDownloadFailed"), what=f"{name} refused")
            message = condition(vm, "Ready")["message"]
            assert message.startswith(f"disk 'root': {url}"), message  # or its .sha256
            assert ": refused: " in message, message
            shown = json.dumps(vm) + json.dumps(events_of(host, name))
            for leak in ("HTTP 401", "Unauthorized", "internal secret", internal.digest):
                assert leak not in shown, (name, leak)
        redirected = json.dumps(host.vm(PROJECT, "redirected")) + json.dumps(events_of(host, "redirected"))
        assert f":{internal_port}" not in redirected, "the redirect target is not shown"
        assert sum(internal.gets.values()) == 0
        assert mirror.gets["/rootfs.raw.sha256"] >= 1
    finally:
        internal.close()
        mirror.close()


def events_of(host: VmHost, name: str) -> list[Any]:
    return host.sql("SELECT reason, message FROM events WHERE project = ? AND vm_name = ?", PROJECT, name)
