"""The read API: projects (published vs pending serial), state versions and VM objects."""

from __future__ import annotations

import json
from typing import Any

from aiohttp.test_utils import TestClient

from api.testing.tfstate import encode, vm_state
from tests.component.conftest import AUTH
from tests.component.test_http_backend import LOCK, STATE, lock_body

Client = TestClient[Any, Any]


async def get_json(client: Client, path: str) -> Any:
    response = await client.get(path, headers=AUTH)
    assert response.status == 200, await response.text()
    return await response.json()


async def test_vm_object_is_kubernetes_shaped(client: Client) -> None:
    """A published VM is served with apiVersion, kind, metadata, spec and status."""
    body = encode(vm_state(4, {"web": {"memory": "1Gi", "labels": {"tier": "web"}}}))
    await client.post(STATE, data=body, headers=AUTH)
    vm = await get_json(client, "/api/v1/projects/lab/vms/web")
    assert (vm["apiVersion"], vm["kind"]) == ("tofu-qemu.dev/v1alpha1", "QemuVM")
    metadata = vm["metadata"]
    assert (metadata["project"], metadata["name"], metadata["generation"], metadata["stateSerial"]) == (
        "lab",
        "web",
        1,
        4,
    )
    assert metadata["labels"] == {"tier": "web"}
    assert metadata["annotations"] == {"tofu-qemu.dev/terraform-address": 'terraform_data.vm["web"]'}
    assert metadata["deletionTimestamp"] is None
    assert vm["spec"]["memory"] == 1024
    assert vm["status"]["phase"] == "Pending"
    assert [(c["type"], c["status"]) for c in vm["status"]["conditions"]] == [("Valid", "True")]


async def test_vm_lists(client: Client) -> None:
    """VMs are listed across projects and per project."""
    for project in ("a", "b"):
        body = encode(vm_state(1, {"web": {}, "db": {}}))
        await client.post(f"/state/{project}", data=body, headers=AUTH)
    everything = await get_json(client, "/api/v1/vms")
    assert [(vm["metadata"]["project"], vm["metadata"]["name"]) for vm in everything["items"]] == [
        ("a", "db"),
        ("a", "web"),
        ("b", "db"),
        ("b", "web"),
    ]
    only_b = await get_json(client, "/api/v1/projects/b/vms")
    assert len(only_b["items"]) == 2


async def test_missing_vm_is_404_json(client: Client) -> None:
    """An unknown VM gets 404 with a message."""
    response = await client.get("/api/v1/projects/lab/vms/nope", headers=AUTH)
    assert response.status == 404
    assert "no VM named 'nope'" in (await response.json())["message"]


async def test_project_shows_published_and_pending_serials(client: Client) -> None:
    """During a locked apply the API shows the pending serial and the lock holder."""
    await client.post(STATE, data=encode(vm_state(1, {"web": {}})), headers=AUTH)
    await client.request("LOCK", LOCK, data=lock_body("holder"), headers=AUTH)
    await client.post(
        STATE, params={"ID": "holder"}, data=encode(vm_state(2, {"web": {"cpus": 2}})), headers=AUTH
    )
    project = await get_json(client, "/api/v1/projects/lab")
    assert (project["serial"], project["publishedSerial"], project["pendingSerial"]) == (2, 1, 2)
    assert project["lock"]["info"]["ID"] == "holder"
    vm = await get_json(client, "/api/v1/projects/lab/vms/web")
    assert vm["metadata"]["generation"] == 1
    await client.request("UNLOCK", LOCK, data=lock_body("holder"), headers=AUTH)
    project = await get_json(client, "/api/v1/projects/lab")
    assert (project["publishedSerial"], project["pendingSerial"], project["lock"]) == (2, None, None)
    vm = await get_json(client, "/api/v1/projects/lab/vms/web")
    assert vm["metadata"]["generation"] == 2


async def test_versions_list_and_fetch(client: Client) -> None:
    """Each write is a listed version with md5 and size, and can be fetched by serial."""
    bodies = [encode(vm_state(serial, {})) for serial in (1, 2)]
    for body in bodies:
        await client.post(STATE, data=body, headers=AUTH)
    versions = (await get_json(client, "/api/v1/projects/lab/states"))["items"]
    assert [(v["serial"], v["size"]) for v in versions] == [(2, len(bodies[1])), (1, len(bodies[0]))]
    response = await client.get("/api/v1/projects/lab/states/1", headers=AUTH)
    assert await response.read() == bodies[0]
    assert (await client.get("/api/v1/projects/lab/states/9", headers=AUTH)).status == 404
    assert (await client.get("/api/v1/projects/lab/states/x", headers=AUTH)).status == 400


async def test_project_problems_and_invalid_vms_are_visible(client: Client) -> None:
    """A nameless manifest is a project problem; an invalid spec is a Valid=False VM."""
    document = vm_state(1, {"web": {"memory": 8}})
    nameless = json.loads(json.dumps(document["resources"][0]["instances"][0]))
    nameless["index_key"] = "x"
    nameless["attributes"]["input"]["value"]["metadata"] = {}
    document["resources"][0]["instances"].append(nameless)
    response = await client.post(STATE, data=encode(document), headers=AUTH)
    assert response.status == 200
    project = await get_json(client, "/api/v1/projects/lab")
    assert project["problems"] == [
        {"address": 'terraform_data.vm["x"]', "message": "metadata.name: a QemuVM needs a name"}
    ]
    vm = await get_json(client, "/api/v1/projects/lab/vms/web")
    assert vm["status"]["phase"] == "Invalid"
    assert vm["status"]["conditions"][0]["message"] == "spec.memory: must be ≥ 16 MiB"


async def test_encrypted_state_is_reported_by_the_api(client: Client) -> None:
    """The project says its specs are unreadable when the state is encrypted."""
    envelope = b'{"serial":2,"lineage":"l","meta":{},"encrypted_data":"AAAA","encryption_version":"v0"}'
    assert (await client.post(STATE, data=envelope, headers=AUTH)).status == 200
    project = await get_json(client, "/api/v1/projects/lab")
    assert project["specs"]["readable"] is False
    assert "encrypted client-side" in project["specs"]["message"]
    assert await (await client.get(STATE, headers=AUTH)).read() == envelope
