"""GET /api/v1/hosts, cordon, uncordon and drain over HTTP; status.host and Scheduled=False on
the VM objects."""

from __future__ import annotations

import argparse
import io
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient

from api.client.connection import ClientError, Connection
from api.client.hosts import HOST_COLUMNS, get_hosts, host_row, host_status
from api.hosts import Resources
from api.server.keys import DATABASE
from api.store.allocations import Allocations, DiskRow
from api.store.hosts import Hosts, Registration
from api.testing.tfstate import encode, vm_state
from api.types import ReclaimPolicy
from tests.component.conftest import AUTH, FakeClock

Client = TestClient[Any, Any]


async def setup_hosts(client: Client) -> tuple[Hosts, dict[str, str]]:
    hosts = Hosts(client.app[DATABASE])
    for name, labels in (("a", {"zone": "x"}), ("b", {})):
        await hosts.register(Registration(name, labels, Resources(4, 8192, 100), lease_seconds=15.0))
    await client.post(
        "/state/lab", data=encode(vm_state(1, {"web": {"memory": 1024}, "db": {}})), headers=AUTH
    )
    uids = {vm.name: vm.uid for vm in await hosts.placed()}
    return hosts, uids


async def test_hosts_need_credentials(client: Client) -> None:
    response = await client.get("/api/v1/hosts")
    assert response.status == 401


async def test_the_list_shows_capacity_allocation_and_vms(client: Client) -> None:
    hosts, uids = await setup_hosts(client)
    assert len(await hosts.place({uids["web"]: "a", uids["db"]: "a"}, {})) == 2
    response = await client.get("/api/v1/hosts", headers=AUTH)
    assert response.status == 200
    items = {host["name"]: host for host in (await response.json())["items"]}
    a = items["a"]
    assert (a["ready"], a["cordoned"], a["labels"], a["vms"]) == (True, False, {"zone": "x"}, 2)
    assert a["capacity"] == {"cpus": 4, "memoryMiB": 8192, "ports": 100}
    assert a["allocated"] == {"cpus": 2, "memoryMiB": 1024 + 256, "ports": 0}
    assert set(a) >= {"name", "ready", "labels", "capacity", "allocated", "vms", "leaseRenewedAt"}
    assert items["b"]["vms"] == 0
    vm = await (await client.get("/api/v1/projects/lab/vms/web", headers=AUTH)).json()
    assert vm["status"]["host"] == "a"


async def test_a_host_whose_lease_ran_out_is_not_ready(client: Client, clock: FakeClock) -> None:
    """The `client` app is on SQLite, whose database clock is the store clock (FakeClock)."""
    await setup_hosts(client)
    clock.advance(15)
    items = (await (await client.get("/api/v1/hosts", headers=AUTH)).json())["items"]
    assert [host["ready"] for host in items] == [False, False]


async def test_cordon_uncordon_and_drain(client: Client) -> None:
    hosts, uids = await setup_hosts(client)
    await hosts.place({uids["web"]: "a", uids["db"]: "a"}, {})
    cordoned = await client.post("/api/v1/hosts/b/cordon", headers=AUTH)
    assert (cordoned.status, (await cordoned.json())["cordoned"]) == (200, True)
    uncordoned = await client.post("/api/v1/hosts/b/uncordon", headers=AUTH)
    assert (await uncordoned.json())["cordoned"] is False
    drained = await client.post("/api/v1/hosts/a/drain", headers=AUTH)
    body = await drained.json()
    assert (body["host"]["cordoned"], sorted(body["moved"]), body["kept"]) == (
        True,
        sorted(uids.values()),
        [],
    )
    vm = await (await client.get("/api/v1/projects/lab/vms/web", headers=AUTH)).json()
    assert vm["status"]["host"] is None
    scheduled = [c for c in vm["status"]["conditions"] if c["type"] == "Scheduled"]
    assert [(c["status"], c["reason"], c["message"]) for c in scheduled] == [
        ("False", "Unschedulable", "drained from host a")
    ]


async def test_unknown_and_malformed_hosts_get_a_status(client: Client) -> None:
    missing = await client.post("/api/v1/hosts/nope/cordon", headers=AUTH)
    assert missing.status == 404
    assert "no host named 'nope'" in (await missing.json())["message"]
    bad = await client.post("/api/v1/hosts/Bad_Name/drain", headers=AUTH)
    assert bad.status == 400
    assert (await bad.json())["kind"] == "Status"


def test_the_cli_table_reads_like_kubectl_get_nodes() -> None:
    host = {
        "name": "a",
        "ready": False,
        "cordoned": True,
        "labels": {"zone": "x"},
        "capacity": {"cpus": 4, "memoryMiB": 8192, "ports": 100},
        "allocated": {"cpus": 2, "memoryMiB": 1536, "ports": 1},
        "vms": 2,
        "leaseRenewedAt": None,
    }
    assert host_status(host) == "NotReady,SchedulingDisabled"
    row = host_row(host, FakeClock()())
    assert dict(zip(HOST_COLUMNS, row, strict=True)) | {"LEASE": ""} == {
        "NAME": "a",
        "STATUS": "NotReady,SchedulingDisabled",
        "VMS": "2",
        "CPUS": "2/4",
        "MEMORY(MiB)": "1536/8192",
        "PORTS": "1/100",
        "LEASE": "",
        "LABELS": "zone=x",
    }


async def test_the_disks_list_shows_every_hosts_disks(client: Client) -> None:
    db = client.app[DATABASE]
    for host, uid in (("a", "vm-a"), ("b", "vm-b")):
        await Allocations(db, host=host).record_disk(
            uid, DiskRow(uid, "root", f"/d/{uid}", ReclaimPolicy.DELETE)
        )
    assert [row.uid for row in await Allocations(db, host="a").disks()] == ["vm-a"]
    listed = await (await client.get("/api/v1/disks", headers=AUTH)).json()
    assert sorted(disk["uid"] for disk in listed["items"]) == ["vm-a", "vm-b"]


def test_get_hosts_refuses_to_watch() -> None:
    args = argparse.Namespace(watch=True, name=None, output="table")
    with pytest.raises(ClientError, match="cannot watch"):
        get_hosts(cast(Connection, None), args, io.StringIO(), FakeClock()(), lambda *_: None)
