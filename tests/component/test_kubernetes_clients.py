"""What kubectl and client-go need besides the QemuVM objects (docs/kubectl.md): discovery,
namespaced paths, server-side Tables, field selectors, bookmarks on request, core/v1 namespaces
and events, OpenAPI v3, and the 405 on writes. The real kubectl runs in tests/e2e/test_kubectl.py."""

from __future__ import annotations

from typing import Any

import pytest

from api.server import kube as kube_server
from api.store import Database
from api.store.events import LIST_LIMIT_MAX, EventLog, NewEvent
from api.testing.tfstate import vm_state
from api.vm_columns import VM_TABLE_COLUMNS
from tests.component.conftest import AUTH, FakeClock
from tests.component.k8s_support import APIS, Client, WatchReader, api, post_state, serve

__all__ = ["api", "serve"]  # fixtures
TABLE = {**AUTH, "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
NAMESPACED = f"{APIS}/namespaces/lab/qemuvms"
# The AGE cell: after NAME, PHASE, READY, ACCEL, PORTS, RESTARTS.
AGE = 6
REFUSED = "QemuVM specs come from Terraform state; change them with tofu apply"


async def declare(api: Client) -> None:
    await post_state(api, "lab", vm_state(1, {"web": {"labels": {"app": "web"}}, "db": {}}))
    await post_state(api, "other", vm_state(1, {"web": {}}))


async def get_json(api: Client, path: str, *, headers: dict[str, str] = AUTH, **params: str) -> Any:
    response = await api.get(path, params=params, headers=headers)
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def test_discovery_names_the_group_and_its_resource(api: Client) -> None:
    """The legacy discovery documents; aggregated discovery is answered as plain JSON, which
    client-go takes as "not served" and falls back from."""
    aggregated = {
        **AUTH,
        "Accept": "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
    }
    assert (await get_json(api, "/api", headers=aggregated))["versions"] == ["v1"]
    groups = await get_json(api, "/apis", headers=aggregated)
    assert groups["kind"] == "APIGroupList"
    assert [g["preferredVersion"]["groupVersion"] for g in groups["groups"]] == ["tofu-qemu.dev/v1alpha1"]
    assert (await get_json(api, "/apis/tofu-qemu.dev"))["name"] == "tofu-qemu.dev"
    resource, *types = (await get_json(api, APIS))["resources"]
    assert [t["name"] for t in types] == [
        "qemuinstancetypes",
        "qemupreferences",
        "qemuclusterinstancetypes",
        "qemuclusterpreferences",
        "qemuvmsnapshots",
        "qemuvmrestores",
    ], "docs/instancetypes.md#the-api, docs/snapshots.md#the-api"
    assert {
        k: resource[k] for k in ("name", "singularName", "namespaced", "kind", "verbs", "shortNames")
    } == {
        "name": "qemuvms",
        "singularName": "qemuvm",
        "namespaced": True,
        "kind": "QemuVM",
        "verbs": ["get", "list", "watch"],
        "shortNames": ["qvm"],
    }
    core = await get_json(api, "/api/v1")
    assert {r["name"]: r["verbs"] for r in core["resources"]} == {
        "namespaces": ["get", "list"],
        "events": ["get", "list"],
    }
    assert (await get_json(api, "/version"))["minor"] == "32"


async def test_namespaced_paths_serve_the_project_objects(api: Client) -> None:
    await declare(api)
    listed = await get_json(api, NAMESPACED)
    assert [item["metadata"]["name"] for item in listed["items"]] == ["db", "web"]
    one = await get_json(api, f"{NAMESPACED}/web")
    assert one == await get_json(api, f"{APIS}/projects/lab/qemuvms/web")
    assert (await api.get(f"{NAMESPACED}/nosuch", headers=AUTH)).status == 404


async def test_a_table_has_the_cli_columns_and_the_object_asked_for(api: Client) -> None:
    """kubectl get: the `tofu-qemu get vms` columns (PROJECT is kubectl's NAMESPACE), wide ones at
    priority 1, each row with PartialObjectMetadata (the default) or the object."""
    await declare(api)
    table = await get_json(api, NAMESPACED, headers=TABLE)
    assert (table["kind"], table["apiVersion"]) == ("Table", "meta.k8s.io/v1")
    columns = [(c["name"].upper(), c["priority"]) for c in table["columnDefinitions"]]
    assert columns == [(c.header, int(c.wide)) for c in VM_TABLE_COLUMNS if c.header != "PROJECT"]
    assert [row["cells"][:2] for row in table["rows"]] == [["db", "Pending"], ["web", "Pending"]]
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    assert table["rows"][0]["object"]["metadata"]["namespace"] == "lab"
    full = await get_json(api, f"{NAMESPACED}/web", headers=TABLE, includeObject="Object")
    assert full["rows"][0]["object"]["kind"] == "QemuVM"
    bare = await get_json(api, f"{APIS}/qemuvms", headers=TABLE, includeObject="None")
    assert all("object" not in row for row in bare["rows"])
    assert (await api.get(NAMESPACED, params={"includeObject": "All"}, headers=TABLE)).status == 400


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("metadata.name=web", ["lab/web", "other/web"]),
        ("metadata.name==web,metadata.namespace=lab", ["lab/web"]),
        ("metadata.name!=web", ["lab/db"]),
        ("", ["lab/db", "lab/web", "other/web"]),
    ],
)
async def test_field_selectors_filter_lists(api: Client, selector: str, expected: list[str]) -> None:
    await declare(api)
    body = await get_json(api, f"{APIS}/qemuvms", fieldSelector=selector)
    assert [f"{i['metadata']['namespace']}/{i['metadata']['name']}" for i in body["items"]] == expected


async def test_an_unsupported_field_is_a_kubernetes_400(api: Client) -> None:
    response = await api.get(f"{APIS}/qemuvms", params={"fieldSelector": "spec.cpus=1"}, headers=AUTH)
    assert (response.status, (await response.json())["message"]) == (
        400,
        "field label not supported: spec.cpus",
    )


async def test_a_watch_sends_bookmarks_only_on_request_and_tables_when_asked(api: Client) -> None:
    """kubectl get -w: no BOOKMARK (it would print it), one-row Tables, the field selector
    applied to the stream."""
    await declare(api)
    params = {"watch": "true", "fieldSelector": "metadata.name=web"}
    reader = WatchReader(await api.get(NAMESPACED, params=params, headers=TABLE))
    first = await reader.next()
    assert (first["type"], first["object"]["kind"], first["object"]["rows"][0]["cells"][0]) == (
        "ADDED",
        "Table",
        "web",
    )
    await post_state(
        api, "lab", vm_state(2, {"web": {"labels": {"app": "v2"}}, "db": {"labels": {"x": "y"}}})
    )
    changed = await reader.next()
    assert (changed["type"], changed["object"]["rows"][0]["cells"][0]) == ("MODIFIED", "web")
    bookmarked = WatchReader(
        await api.get(NAMESPACED, params={"watch": "1", "allowWatchBookmarks": "1"}, headers=AUTH)
    )
    assert [(await bookmarked.next())["type"] for _ in range(3)] == ["ADDED", "ADDED", "BOOKMARK"]


async def test_a_watched_row_shows_its_age_when_it_is_sent(api: Client, clock: FakeClock) -> None:
    """Ages are computed per event, not when the watch began (kubectl printed "<invalid>")."""
    await declare(api)
    reader = WatchReader(await api.get(f"{NAMESPACED}/web", headers=TABLE))
    assert (await reader.response.json())["rows"][0]["cells"][AGE] == "0s"
    watch = WatchReader(await api.get(NAMESPACED, params={"watch": "1"}, headers=TABLE))
    await watch.next()
    await watch.next()
    clock.advance(300)
    await post_state(api, "lab", vm_state(2, {"web": {"labels": {"app": "v2"}}, "db": {}}))
    assert (await watch.next())["object"]["rows"][0]["cells"][AGE] == "5m"


async def test_projects_are_namespaces(api: Client) -> None:
    await declare(api)
    listed = await get_json(api, "/api/v1/namespaces")
    assert (listed["kind"], [n["metadata"]["name"] for n in listed["items"]]) == (
        "NamespaceList",
        ["lab", "other"],
    )
    assert (await get_json(api, "/api/v1/namespaces/lab"))["status"]["phase"] == "Active"
    assert (await api.get("/api/v1/namespaces/nosuch", headers=AUTH)).status == 404
    table = await get_json(api, "/api/v1/namespaces", headers=TABLE)
    assert [row["cells"] for row in table["rows"]] == [["lab", "Active"], ["other", "Active"]]


async def test_events_are_core_v1_events_filtered_as_kubectl_describe_asks(api: Client) -> None:
    await declare(api)
    web = await get_json(api, f"{NAMESPACED}/web")
    uid = web["metadata"]["uid"]
    selector = ",".join(
        (
            "involvedObject.name=web",
            "involvedObject.namespace=lab",
            "involvedObject.kind=QemuVM",
            f"involvedObject.uid={uid}",
        )
    )
    events = await get_json(api, "/api/v1/namespaces/lab/events", fieldSelector=selector)
    [created] = events["items"]
    assert (events["kind"], created["reason"], created["type"]) == ("EventList", "Created", "Normal")
    involved = {"apiVersion": "tofu-qemu.dev/v1alpha1", "kind": "QemuVM", "name": "web", "namespace": "lab"}
    assert created["involvedObject"] == {**involved, "uid": uid}
    other_uid = selector.replace(uid, "not-this-one")
    assert (await get_json(api, "/api/v1/namespaces/lab/events", fieldSelector=other_uid))["items"] == []
    everything = await get_json(api, "/api/v1/namespaces/lab/events")
    assert sorted(e["involvedObject"]["name"] for e in everything["items"]) == ["db", "web"]
    table = await get_json(api, "/api/v1/namespaces/lab/events", headers=TABLE)
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Last Seen",
        "Type",
        "Reason",
        "Object",
        "Message",
    ]
    assert {row["cells"][3] for row in table["rows"]} == {"qemuvm/web", "qemuvm/db"}


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", NAMESPACED), ("DELETE", NAMESPACED), ("PUT", f"{NAMESPACED}/web"),
     ("PATCH", f"{NAMESPACED}/web"), ("DELETE", f"{NAMESPACED}/web")],
)  # fmt: skip
async def test_writes_are_refused_with_a_kubernetes_405(api: Client, method: str, path: str) -> None:
    await declare(api)
    response = await api.request(method, path, headers=AUTH, json={"spec": {"cpus": 2}})
    body = await response.json()
    assert (response.status, response.headers["Allow"]) == (405, "GET")
    assert body == {
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 405,
        "reason": "MethodNotAllowed", "message": REFUSED,
    }  # fmt: skip
    assert (await get_json(api, f"{NAMESPACED}/web"))["spec"].get("cpus", 1) == 1


async def test_openapi_v3_serves_the_crd_schema_for_explain(api: Client) -> None:
    index = await get_json(api, "/openapi/v3")
    url = index["paths"]["apis/tofu-qemu.dev/v1alpha1"]["serverRelativeURL"]
    response = await api.get(url, headers=AUTH)
    assert response.headers["Cache-Control"] == "public, immutable"
    document = await response.json()
    schema = document["components"]["schemas"]["dev.tofu-qemu.v1alpha1.QemuVM"]
    assert schema["x-kubernetes-group-version-kind"] == [
        {"group": "tofu-qemu.dev", "version": "v1alpha1", "kind": "QemuVM"}
    ]
    assert schema["properties"]["spec"]["properties"]["cpus"] == {
        "default": 1,
        "maximum": 64,
        "minimum": 1,
        "type": "integer",
        "description": "Between 1 and 64.",
    }
    listed = document["paths"]["/apis/tofu-qemu.dev/v1alpha1/namespaces/{namespace}/qemuvms"]
    assert listed["get"]["x-kubernetes-group-version-kind"]["kind"] == "QemuVM"
    assert "fieldValidation" in str(listed["post"]["parameters"])
    v2 = await api.get("/openapi/v2", headers=AUTH)
    assert (v2.status, (await v2.json())["kind"]) == (404, "Status")


async def test_resource_version_match_follows_kubernetes(api: Client) -> None:
    """NotOlderThan and Exact at the current version list; Exact at another version is 410
    (only the newest state is kept); the invalid combinations are 400s, as in Kubernetes."""
    await declare(api)
    current = (await get_json(api, NAMESPACED))["metadata"]["resourceVersion"]
    for match in ("NotOlderThan", "Exact"):
        listed = await get_json(api, NAMESPACED, resourceVersion=current, resourceVersionMatch=match)
        assert listed["metadata"]["resourceVersion"] == current
    older = await api.get(
        NAMESPACED, params={"resourceVersion": "1", "resourceVersionMatch": "Exact"}, headers=AUTH
    )
    assert (older.status, (await older.json())["reason"]) == (410, "Expired")
    for query in (
        {"resourceVersionMatch": "Exact"},
        {"resourceVersion": current, "resourceVersionMatch": "Newest"},
        {"resourceVersion": current, "resourceVersionMatch": "Exact", "watch": "1"},
    ):
        assert (await api.get(NAMESPACED, params=query, headers=AUTH)).status == 400, query


async def test_core_events_are_500_per_request_unless_limited(api: Client, db: Database) -> None:
    """kubectl describe pages 500 at a time: the default; `limit` beyond the event log's list
    limit (1000) is capped there."""
    await declare(api)
    many = [NewEvent("", "busy", "", "ForceUnlocked", f"unlock {n}") for n in range(1100)]
    await EventLog(db).record(*many)
    path = "/api/v1/namespaces/busy/events"
    assert len((await get_json(api, path))["items"]) == kube_server.EVENTS_LIMIT_DEFAULT == 500
    assert len((await get_json(api, path, limit="5000"))["items"]) == LIST_LIMIT_MAX == 1000
    assert (await get_json(api, path, limit="3"))["items"][-1]["message"] == "unlock 1099"
