"""Snapshots and restores in the store and the API, on both engines (docs/snapshots.md): declared
ones come and go with the state, requested ones (POST .../snapshot, .../restore) stay until
deleted, a declared name hides a requested one and is never deleted through the API, and a
status shows only for the revision it was written for."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from api.store import Database
from api.store import snapshots as snapshots_store
from api.store.snapshots import SnapshotStore
from api.testing.tfstate import instance, manifest, resource, state
from tests.component.conftest import AUTH
from tests.component.k8s_support import APIS, Client, api, post_state, serve

__all__ = ["api", "serve"]  # fixtures
T0 = datetime(2026, 12, 3, tzinfo=UTC)


def snapshot_state(serial: int, snapshots: dict[str, str]) -> dict[str, Any]:
    declared: list[dict[str, Any]] = [
        {
            "apiVersion": "tofu-qemu.dev/v1alpha1",
            "kind": "QemuVMSnapshot",
            "metadata": {"name": name},
            "spec": {"source": {"name": vm}},
        }
        for name, vm in snapshots.items()
    ]
    return state(
        serial,
        [
            resource("vm", [instance(manifest("web"), index_key="web")]),
            resource(
                "snap", [instance(s, index_key=name) for name, s in zip(snapshots, declared, strict=True)]
            ),
        ],
    )


async def test_declared_snapshots_go_with_the_state_and_keep_their_status_per_revision(
    api: Client, db: Database
) -> None:
    store = SnapshotStore(db)
    await post_state(api, "lab", snapshot_state(1, {"nightly": "web"}))
    [nightly] = await store.list("QemuVMSnapshot", project="lab")
    assert (nightly.name, nightly.spec, nightly.status, nightly.requested) == (
        "nightly",
        {"source": {"name": "web"}},
        None,
        False,
    )
    await store.write_status("QemuVMSnapshot", "lab", "nightly", nightly.revision, {"readyToUse": True}, T0)
    answer = await (await api.get("/api/v1/projects/lab/snapshots/nightly", headers=AUTH)).json()
    assert answer["status"]["readyToUse"] is True
    listed = await (await api.get(f"{APIS}/namespaces/lab/qemuvmsnapshots", headers=AUTH)).json()
    assert [item["metadata"]["name"] for item in listed["items"]] == ["nightly"]

    # Another source is another revision: the old status no longer shows.
    await post_state(api, "lab", snapshot_state(2, {"nightly": "other"}))
    [moved] = await store.list("QemuVMSnapshot", project="lab")
    assert moved.status is None
    await post_state(api, "lab", snapshot_state(3, {}))
    assert await store.list("QemuVMSnapshot") == []
    assert await store.forget_undeclared() == 1
    missing = await api.get("/api/v1/projects/lab/snapshots/nightly", headers=AUTH)
    assert missing.status == 404


async def test_requested_snapshots_stay_until_deleted_and_never_take_a_declared_name(api: Client) -> None:
    await post_state(api, "lab", snapshot_state(1, {"nightly": "web"}))
    taken = await api.post(f"{APIS}/projects/lab/qemuvms/web/snapshot?snapshot=manual", headers=AUTH)
    assert taken.status == 200, await taken.text()
    assert (await taken.json())["spec"] == {"source": {"name": "web"}}
    again = await api.post(f"{APIS}/projects/lab/qemuvms/web/snapshot?snapshot=manual", headers=AUTH)
    assert again.status == 409
    declared = await api.post(f"{APIS}/projects/lab/qemuvms/web/snapshot?snapshot=nightly", headers=AUTH)
    assert declared.status == 409
    assert (
        await api.post(f"{APIS}/projects/lab/qemuvms/gone/snapshot?snapshot=x", headers=AUTH)
    ).status == 404
    assert (
        await api.post(f"{APIS}/projects/lab/qemuvms/web/snapshot?snapshot=Bad", headers=AUTH)
    ).status == 400
    assert (await api.post(f"{APIS}/projects/lab/qemuvms/web/snapshot", headers=AUTH)).status == 400

    restore = await api.post(
        f"{APIS}/projects/lab/qemuvms/web/restore?snapshot=manual&restore=undo", headers=AUTH
    )
    assert (await restore.json())["spec"] == {"target": {"name": "web"}, "snapshot": "manual"}

    # A publish replaces the declared ones only.
    await post_state(api, "lab", snapshot_state(2, {}))
    listed = await (await api.get("/api/v1/projects/lab/snapshots", headers=AUTH)).json()
    assert [item["metadata"]["name"] for item in listed["items"]] == ["manual"]

    await post_state(api, "lab", snapshot_state(3, {"nightly": "web"}))
    assert (await api.delete("/api/v1/projects/lab/snapshots/nightly", headers=AUTH)).status == 409
    assert (await api.delete("/api/v1/projects/lab/snapshots/manual", headers=AUTH)).status == 200
    assert (await api.delete("/api/v1/projects/lab/snapshots/manual", headers=AUTH)).status == 404
    assert (await api.delete("/api/v1/projects/lab/restores/undo", headers=AUTH)).status == 200
    assert (await api.post(f"{APIS}/projects/lab/qemuvms/web/snapshot?snapshot=x", headers={})).status == 401


async def test_a_project_holds_at_most_its_share_of_requested_snapshots_and_restores(
    api: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each requested snapshot holds a row and a tag in every disk until deleted: a bounded number."""
    assert snapshots_store.REQUESTED_PER_PROJECT_MAX == 256
    monkeypatch.setattr(snapshots_store, "REQUESTED_PER_PROJECT_MAX", 2)
    await post_state(api, "lab", snapshot_state(1, {}))
    for name in ("one", "two"):
        taken = await api.post(f"{APIS}/projects/lab/qemuvms/web/snapshot?snapshot={name}", headers=AUTH)
        assert taken.status == 200, await taken.text()
    refused = await api.post(f"{APIS}/projects/lab/qemuvms/web/restore?snapshot=one", headers=AUTH)
    assert refused.status == 403
    assert "delete some first" in (await refused.json())["message"]
    assert (await api.delete("/api/v1/projects/lab/snapshots/two", headers=AUTH)).status == 200
    again = await api.post(f"{APIS}/projects/lab/qemuvms/web/restore?snapshot=one", headers=AUTH)
    assert again.status == 200, await again.text()
