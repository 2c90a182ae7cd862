"""Instance types and preferences in the store and the API, on both engines: stored at publish
with the VMs, a change wakes the VMs that reference it without changing their generation, the
catalog answers namespaced and cluster-wide lookups, and the Kubernetes-shaped lists serve them
(docs/instancetypes.md)."""

from __future__ import annotations

import json
from typing import Any

from api.instancetypes import Found, Ref, revision_of
from api.store import Database, StateStore, VMStore
from api.store.fleet import fleet_snapshot
from api.store.instancetypes import InstanceTypeCatalog
from api.store.status_writer import VMStatusWriter
from api.testing.tfstate import encode, instance, manifest, resource, state
from api.tfstate import extract_vms, parse_state
from controller.admission import Quota, Quotas
from controller.clock import ManualClock
from controller.quota_gate import FRESH_SECONDS, QuotaGate
from tests.component.conftest import AUTH
from tests.component.k8s_support import APIS, Client, api, post_state, serve
from tests.component.test_store_states import lock_info

__all__ = ["api", "serve"]  # fixtures
CLUSTER = {"QemuClusterInstanceType": {"u1.small": {"cpus": 1, "memory": 512}}, "QemuClusterPreference": {}}


def type_manifest(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "tofu-qemu.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def typed_state(serial: int, memory: int, *, preference: bool = True) -> dict[str, Any]:
    types = [type_manifest("QemuInstanceType", "small", {"cpus": 1, "memory": memory})]
    if preference:
        types.append(type_manifest("QemuPreference", "linux", {"stopTimeout": 10}))
    vms = {
        "typed": manifest("typed", instanceType={"name": "small"}, memory=None),
        "plain": manifest("plain"),
    }
    vms["typed"]["spec"].pop("memory")
    return state(
        serial,
        [
            resource("types", [instance(t, index_key=t["metadata"]["name"]) for t in types]),
            resource("vm", [instance(m, index_key=name) for name, m in vms.items()]),
        ],
    )


async def write(states: StateStore, document: dict[str, Any], *, lock_id: str | None = None) -> None:
    body = encode(document)
    summary = parse_state(body)
    await states.write("lab", body, summary, extract_vms(summary.document), lock_id=lock_id)


async def vm_versions(vms: VMStore) -> dict[str, tuple[int, int]]:
    return {r.name: (r.generation, r.resource_version) for r in await vms.list_records(project="lab")}


async def test_types_are_stored_when_published_and_go_with_the_state(
    states: StateStore, db: Database
) -> None:
    catalog = InstanceTypeCatalog(db, CLUSTER)
    await states.lock("lab", lock_info("a"))
    await write(states, typed_state(1, 256), lock_id="a")
    assert await catalog.list("QemuInstanceType") == [], "a write under a lock is not published yet"
    await states.unlock("lab", "a")
    [small] = await catalog.list("QemuInstanceType", project="lab")
    assert (small.project, small.name, small.spec, small.generation) == (
        "lab",
        "small",
        {"cpus": 1, "memory": 256},
        1,
    )
    assert small.revision == revision_of({"cpus": 1, "memory": 256})
    assert [p.name for p in await catalog.list("QemuPreference")] == ["linux"]

    await write(states, typed_state(2, 256, preference=False))
    assert await catalog.list("QemuPreference") == [], "removed from the state, removed from the store"
    await states.delete("lab", lock_id=None)
    assert await catalog.list("QemuInstanceType") == []


async def test_a_changed_type_wakes_its_vms_without_a_new_generation(
    states: StateStore, vms: VMStore, db: Database
) -> None:
    await write(states, typed_state(1, 256))
    before = await vm_versions(vms)
    await write(states, typed_state(2, 256))
    assert await vm_versions(vms) == before, "an unchanged type touches nothing"

    await write(states, typed_state(3, 512))
    after = await vm_versions(vms)
    assert after["plain"] == before["plain"]
    assert after["typed"][0] == before["typed"][0], "same generation: the VM's own spec did not change"
    assert after["typed"][1] > before["typed"][1], "a new resourceVersion: the controller looks again"
    [small] = await InstanceTypeCatalog(db, CLUSTER).list("QemuInstanceType")
    assert (small.generation, small.spec["memory"]) == (2, 512)


async def test_the_catalog_finds_namespaced_and_cluster_wide_types(states: StateStore, db: Database) -> None:
    invalid = type_manifest("QemuInstanceType", "broken", {"cpus": 1})
    await write(states, state(1, [resource("t", [instance(invalid)])]))
    catalog = InstanceTypeCatalog(db, CLUSTER)
    found = await catalog.lookup("lab", Ref("QemuInstanceType", "broken"))
    assert found is not None
    assert found.error is not None
    assert "memory" in found.error
    assert await catalog.lookup("other", Ref("QemuInstanceType", "broken")) is None, "namespaced per project"
    assert await catalog.lookup("lab", Ref("QemuClusterInstanceType", "u1.small")) == Found(
        {"cpus": 1, "memory": 512}
    )
    assert await catalog.lookup("lab", Ref("QemuClusterInstanceType", "broken")) is None


async def test_the_api_lists_types_beside_qemuvms(api: Client) -> None:
    await post_state(api, "lab", typed_state(1, 256))
    response = await api.get(f"{APIS}/namespaces/lab/qemuinstancetypes", headers=AUTH)
    listing = await response.json()
    assert response.status == 200, listing
    assert listing["kind"] == "QemuInstanceTypeList"
    [small] = listing["items"]
    assert small["kind"] == "QemuInstanceType"
    assert small["metadata"]["namespace"] == "lab"
    assert small["spec"] == {"cpus": 1, "memory": 256}
    assert small["status"]["conditions"][0]["status"] == "True"
    every = await (await api.get(f"{APIS}/qemupreferences", headers=AUTH)).json()
    assert [item["metadata"]["name"] for item in every["items"]] == ["linux"]
    cluster = await (await api.get(f"{APIS}/qemuclusterinstancetypes/u1.medium", headers=AUTH)).json()
    assert cluster["spec"] == {"cpus": 1, "memory": 1024}
    assert "namespace" not in cluster["metadata"]
    missing = await api.get(f"{APIS}/namespaces/lab/qemuinstancetypes/huge", headers=AUTH)
    assert missing.status == 404
    assert "no QemuInstanceType named 'huge' in project 'lab'" in (await missing.json())["message"]
    assert (await api.get(f"{APIS}/qemuclusterpreferences", headers={})).status == 401


async def test_kubectl_gets_a_table_and_finds_the_kinds_by_discovery(api: Client) -> None:
    await post_state(api, "lab", typed_state(1, 256))
    discovery = await (await api.get(APIS, headers=AUTH)).json()
    resources = {r["name"]: r for r in discovery["resources"]}
    assert resources["qemuinstancetypes"]["namespaced"] is True
    assert resources["qemuclusterinstancetypes"]["namespaced"] is False
    assert resources["qemupreferences"]["kind"] == "QemuPreference"
    table_type = "application/json;as=Table;v=v1;g=meta.k8s.io, application/json"
    table = await (
        await api.get(f"{APIS}/qemuclusterinstancetypes", headers={**AUTH, "Accept": table_type})
    ).json()
    assert table["kind"] == "Table"
    names = [column["name"] for column in table["columnDefinitions"]]
    assert names[:4] == ["Name", "CPUs", "Memory", "Revision"]
    assert [row["cells"][:3] for row in table["rows"]] == [
        ["u1.large", 2, "2048Mi"],
        ["u1.medium", 1, "1024Mi"],
        ["u1.small", 1, "512Mi"],
    ]


async def test_rollout_is_recorded_and_leaves_a_stop_in_place(api: Client) -> None:
    await post_state(api, "lab", typed_state(1, 256))
    base = f"{APIS}/projects/lab/qemuvms/typed"
    assert (await api.post(f"{base}/stop", headers=AUTH)).status == 200
    response = await api.post(f"{base}/rollout", headers=AUTH)
    vm = await response.json()
    assert response.status == 200, vm
    override = vm["status"]["override"]
    assert override["rolloutRequestedAt"] is not None
    assert override["stopped"] is True
    events = await (await api.get(f"{base}/events", headers=AUTH)).json()
    assert "RolloutRequested" in json.dumps(events)


def sized_state(serial: int, memory: int) -> dict[str, Any]:
    """Two VMs sized by one type, and one by a cluster-wide type."""
    big = type_manifest("QemuInstanceType", "big", {"cpus": 2, "memory": memory})
    vms = {name: manifest(name, instanceType={"name": "big"}) for name in ("a", "b")}
    vms["c"] = manifest("c", instanceType={"name": "u1.small", "kind": "QemuClusterInstanceType"})
    for vm in vms.values():
        vm["spec"].pop("memory")
    return state(
        serial,
        [resource("t", [instance(big)]), resource("vm", [instance(m, index_key=n) for n, m in vms.items()])],
    )


async def test_quotas_count_the_type_size_and_follow_its_changes(
    states: StateStore, vms: VMStore, db: Database
) -> None:
    """A VM sized by a type claims the type's cpus and memory, not the spec defaults (1 CPU,
    512 MiB): instance types are no way around max_memory_mib."""
    await write(states, sized_state(1, 1024))
    clock = ManualClock()
    quotas = Quotas(server=Quota(max_memory_mib=2048 + 511))
    gate = QuotaGate(
        db, quotas, port_range=(20000, 20099), clock=clock, sizes=InstanceTypeCatalog(db, CLUSTER)
    )
    found = [(r.uid, r.generation) for r in await vms.list_records(project="lab")]
    verdicts = [await gate.admission(*vm) for vm in found]
    refused = [verdict.message for verdict in verdicts if not verdict.admitted]
    # 2 x 1024 + 512 = 2560 MiB: one is refused (the spec defaults would claim 3 x 512).
    assert len(refused) == 1, verdicts
    assert refused[0].startswith("server max_memory_mib:")

    await write(states, sized_state(2, 512))
    clock.advance(FRESH_SECONDS)
    assert all([(await gate.admission(*vm)).admitted for vm in found]), "the shrunk type counts at once"


async def test_fleet_sums_count_the_size_a_vm_took_from_its_type(
    states: StateStore, vms: VMStore, db: Database
) -> None:
    """tofu_qemu_memory_requested_bytes and the cpus beside it: a typed VM counts the size in
    its status once the controller has taken a revision (its spec has none)."""
    await write(states, typed_state(1, 256))
    typed = next(r for r in await vms.list_records(project="lab") if r.name == "typed")
    taken = {"kind": "QemuInstanceType", "name": "small", "revision": "r", "generation": 1}
    status = {
        "phase": "Running",
        "instanceType": {**taken, "spec": {"cpus": 3, "memory": 300}, "takenAt": "x"},
    }
    await VMStatusWriter(db).write_status(typed.uid, status)
    [group] = [g for g in (await fleet_snapshot(db)).vm_groups if g.project == "lab" and g.phase == "Running"]
    assert (group.count, group.memory_mib, group.cpus) == (1, 300, 3)
    [pending] = [
        g for g in (await fleet_snapshot(db)).vm_groups if g.project == "lab" and g.phase == "Pending"
    ]
    assert (pending.memory_mib, pending.cpus) == (256, 1), "the plain VM's spec, as before"
