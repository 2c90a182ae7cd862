"""A full disk under the data dir: state writes answer 507 and change nothing, reads go on,
and writes succeed again once space returns.

The data dir lives on a tiny tmpfs mounted under tmp_path and filled up with a filler file, so
SQLite meets a real ENOSPC. Mounting needs privilege: the tests skip, saying so, only when the
first mount attempt is refused.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.settings import ServerSettings
from api.testing.tfstate import encode, vm_state
from tests.component.conftest import AUTH

Client = TestClient[Any, Any]
MakeClient = Callable[[ServerSettings], Awaitable[Client]]
TMPFS_SIZE = "4m"
STATE = "/state/lab"
# Messages mount(8) prints when the caller may not mount (no CAP_SYS_ADMIN, user namespaces...).
NOT_PERMITTED = ("permission denied", "operation not permitted", "must be superuser", "only root")


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs under tmp_path, unmounted (lazily if still busy) at teardown."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("mounting a tmpfs is not possible here: mount(8) or umount(8) is not installed")
    argv = [mount, "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount_point)]
    attempt = subprocess.run(argv, capture_output=True, text=True, check=False)
    if attempt.returncode != 0:
        reason = attempt.stderr.strip() or f"exit status {attempt.returncode}"
        if any(phrase in reason.lower() for phrase in NOT_PERMITTED):
            pytest.skip(f"mounting a tmpfs is not permitted here: {reason}")
        pytest.fail(f"mount -t tmpfs failed: {reason}")
    try:
        yield mount_point
    finally:
        unmounted = subprocess.run([umount, str(mount_point)], capture_output=True, check=False)
        if unmounted.returncode != 0:
            subprocess.run([umount, "-l", str(mount_point)], check=True)


def fill(path: Path) -> None:
    """Write `path` until the filesystem has no byte left (ENOSPC at every write size)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1024 * 1024, 4096, 1):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(descriptor, chunk)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(descriptor)


@dataclass
class FullDisk:
    client: Client
    settings: ServerSettings
    filler: Path
    previous: bytes
    # Far larger than any slack SQLite's files could have left: it cannot fit.
    next_state: bytes


@pytest.fixture
async def full_disk(tiny_tmpfs: Path, make_client: MakeClient, settings: ServerSettings) -> FullDisk:
    """A server whose data dir is full, holding one state written before it filled up.

    `tiny_tmpfs` comes first in the arguments, so it is torn down last: after aiohttp_client
    has closed the client, and with it the store.
    """
    on_tmpfs = settings.model_copy(
        update={"data_dir": tiny_tmpfs / "data", "max_body_bytes": 2 * 1024 * 1024}
    )
    client = await make_client(on_tmpfs)
    previous = encode(vm_state(1, {"web": {}}))
    assert (await client.post(STATE, data=previous, headers=AUTH)).status == 200
    filler = tiny_tmpfs / "filler"
    fill(filler)
    return FullDisk(
        client=client,
        settings=on_tmpfs,
        filler=filler,
        previous=previous,
        next_state=encode(vm_state(2, {f"vm-{index}": {} for index in range(300)})),
    )


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_state_write_on_a_full_disk_is_507_with_a_clear_message(
    full_disk: FullDisk, method: str
) -> None:
    """The write is refused with 507 and a JSON Status that says the data dir is full."""
    response = await full_disk.client.request(method, STATE, data=full_disk.next_state, headers=AUTH)
    assert response.status == 507
    body = await response.json()
    assert (body["kind"], body["code"], body["reason"]) == ("Status", 507, "InsufficientStorage")
    assert body["message"] == "the data dir is full; the write was not stored"


async def test_previous_state_stays_intact_after_a_failed_write(
    full_disk: FullDisk, make_client: MakeClient
) -> None:
    """After the 507 the stored state is byte-identical, also to a new server reading the store."""
    assert (await full_disk.client.post(STATE, data=full_disk.next_state, headers=AUTH)).status == 507
    fresh = await make_client(full_disk.settings)
    for client in (full_disk.client, fresh):
        response = await client.get(STATE, headers=AUTH)
        assert (response.status, await response.read()) == (200, full_disk.previous)
        versions = await (await client.get("/api/v1/projects/lab/states", headers=AUTH)).json()
        assert [version["serial"] for version in versions["items"]] == [1]
        project = await (await client.get("/api/v1/projects/lab", headers=AUTH)).json()
        assert (project["serial"], project["publishedSerial"], project["vmCount"]) == (1, 1, 1)


async def test_reads_are_served_while_the_disk_is_full(full_disk: FullDisk) -> None:
    """Probes, the state, its versions and the VM API all answer while writes cannot."""
    client = full_disk.client
    assert (await client.post(STATE, data=full_disk.next_state, headers=AUTH)).status == 507
    for path in ("/healthz", "/readyz"):
        assert (await client.get(path)).status == 200, path
    for path in (STATE, "/api/v1/projects/lab/states/1", "/api/v1/projects", "/api/v1/vms", "/metrics"):
        assert (await client.get(path, headers=AUTH)).status == 200, path
    vm = await (await client.get("/api/v1/projects/lab/vms/web", headers=AUTH)).json()
    assert vm["metadata"]["name"] == "web"


async def test_writes_succeed_again_when_space_returns(full_disk: FullDisk) -> None:
    """Freeing the disk is all it takes: the same write then succeeds and is served back."""
    client = full_disk.client
    assert (await client.post(STATE, data=full_disk.next_state, headers=AUTH)).status == 507
    full_disk.filler.unlink()
    response = await client.post(STATE, data=full_disk.next_state, headers=AUTH)
    assert (response.status, (await response.json())["serial"]) == (200, 2)
    stored = await client.get(STATE, headers=AUTH)
    assert await stored.read() == full_disk.next_state
    project = await (await client.get("/api/v1/projects/lab", headers=AUTH)).json()
    assert (project["serial"], project["vmCount"]) == (2, 300)
