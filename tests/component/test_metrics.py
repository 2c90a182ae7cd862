"""GET /metrics over real HTTP: auth, controller-runtime names, and gauges that agree with the store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.infra.credentials import load_credentials
from api.infra.metrics import CONTROLLER_NAME, Metrics
from api.server import create_app
from api.server import metrics as metrics_handler
from api.server.ops import create_ops_app
from api.settings import ServerSettings
from api.store import Database, open_database
from api.store.metrics import StoreMetrics, attach_store_metrics
from api.store.status_writer import VMStatusWriter
from api.testing.tfstate import encode, vm_state
from tests.component.conftest import AUTH, ClientFactory, FakeClock

Client = TestClient[Any, Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MiB = 1024 * 1024
CREDENTIALS = load_credentials(users="alice:s3cret", tokens=None, users_file=None)


@pytest.fixture
def serve(
    aiohttp_client: ClientFactory, db: Database, clock: FakeClock, settings: ServerSettings
) -> Callable[..., Awaitable[Client]]:
    """The app on the test's own store, so a test can also write status as the controller does."""

    async def make(**overrides: Any) -> Client:
        app = create_app(
            settings.model_copy(update=overrides), credentials=CREDENTIALS, clock=clock, database=db
        )
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(serve: Callable[..., Awaitable[Client]]) -> Client:
    return await serve()


async def scrape(client: Client) -> Samples:
    response = await client.get("/metrics", headers=AUTH)
    assert response.status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: got for (sample_name, labels), got in samples.items() if sample_name == name}


async def post_state(client: Client, project: str, document: dict[str, Any]) -> bytes:
    body = encode(document)
    response = await client.post(f"/state/{project}", data=body, headers=AUTH)
    assert response.status == 200
    return body


async def test_metrics_need_auth_by_default(client: Client) -> None:
    """Without credentials /metrics answers 401, like every non-probe route."""
    response = await client.get("/metrics")
    assert response.status == 401


async def test_metrics_are_public_when_metrics_auth_is_off(serve: Callable[..., Awaitable[Client]]) -> None:
    """metrics_auth=False serves /metrics without credentials, in Prometheus text format."""
    client = await serve(metrics_auth=False)
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    assert (await client.get("/api/v1/projects")).status == 401


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("controller_runtime_reconcile_total", "counter"),
        ("controller_runtime_reconcile_errors_total", "counter"),
        ("controller_runtime_reconcile_time_seconds", "histogram"),
        ("workqueue_depth", "gauge"),
        ("workqueue_adds_total", "counter"),
        ("workqueue_retries_total", "counter"),
        ("workqueue_queue_duration_seconds", "histogram"),
        ("workqueue_work_duration_seconds", "histogram"),
    ],
)
async def test_controller_runtime_names_are_exposed(client: Client, name: str, kind: str) -> None:
    """The controller-runtime and workqueue metrics carry HELP and TYPE under their exact names."""
    text = await (await client.get("/metrics", headers=AUTH)).text()
    assert f"# HELP {name} " in text
    assert f"# TYPE {name} {kind}" in text


async def test_reconcile_results_start_at_zero(client: Client) -> None:
    """Every result of the qemuvm controller is a series from the start, as controller-runtime does."""
    samples = await scrape(client)
    results = {
        dict(labels)["result"]: got
        for labels, got in series(samples, "controller_runtime_reconcile_total").items()
        if dict(labels)["controller"] == CONTROLLER_NAME
    }
    assert results == {"success": 0, "error": 0, "requeue": 0, "requeue_after": 0}
    assert value(samples, "workqueue_depth", name="qemuvm") == 0


async def test_vm_gauges_agree_with_the_vm_api(client: Client) -> None:
    """VMs by phase, requested memory and vCPUs, and state size match what the API serves."""
    body = await post_state(
        client, "lab", vm_state(1, {"web": {"memory": "1Gi", "cpus": 2}, "db": {}, "cache": {"cpus": 4}})
    )
    listed = (await (await client.get("/api/v1/projects/lab/vms", headers=AUTH)).json())["items"]

    samples = await scrape(client)

    assert value(samples, "tofu_qemu_vms", project="lab", phase="Pending") == len(listed) == 3
    memory = sum(vm["spec"]["memory"] for vm in listed) * MiB
    assert value(samples, "tofu_qemu_memory_requested_bytes", project="lab") == memory
    assert value(samples, "tofu_qemu_vcpus_requested", project="lab") == 2 + 1 + 4
    assert value(samples, "tofu_qemu_state_bytes", project="lab") == len(body)
    assert value(samples, "tofu_qemu_host_ports_in_use") == 0
    assert series(samples, "tofu_qemu_memory_running_bytes") == {}


async def test_invalid_specs_count_as_invalid_and_request_nothing(client: Client) -> None:
    """A VM whose spec is invalid shows phase Invalid and adds nothing to requested resources."""
    await post_state(client, "lab", vm_state(1, {"good": {}, "bad": {"memory": 1}}))
    samples = await scrape(client)
    assert value(samples, "tofu_qemu_vms", project="lab", phase="Invalid") == 1
    assert value(samples, "tofu_qemu_vms", project="lab", phase="Pending") == 1
    assert value(samples, "tofu_qemu_memory_requested_bytes", project="lab") == 256 * MiB


async def test_running_vms_follow_their_status(client: Client, db: Database) -> None:
    """A VM whose status says Running moves to that phase and counts as running resources."""
    await post_state(client, "lab", vm_state(1, {"web": {"cpus": 2}, "db": {}}))
    listed = (await (await client.get("/api/v1/projects/lab/vms", headers=AUTH)).json())["items"]
    web_uid = next(vm["metadata"]["uid"] for vm in listed if vm["metadata"]["name"] == "web")
    await VMStatusWriter(db).write_status(web_uid, {"phase": "Running"})

    samples = await scrape(client)

    assert value(samples, "tofu_qemu_vms", project="lab", phase="Running") == 1
    assert value(samples, "tofu_qemu_vms", project="lab", phase="Pending") == 1
    assert value(samples, "tofu_qemu_memory_running_bytes", project="lab") == 256 * MiB
    assert value(samples, "tofu_qemu_vcpus_running", project="lab") == 2


async def test_label_sets_vanish_with_their_vms(client: Client, db: Database) -> None:
    """Deleting VMs still count; once finalized, their project's series are gone, not frozen."""
    await post_state(client, "lab", vm_state(1, {"web": {}}))
    await post_state(client, "other", vm_state(1, {"x": {}}))
    [record] = (await (await client.get("/api/v1/projects/lab/vms", headers=AUTH)).json())["items"]
    await scrape(client)

    await post_state(client, "lab", vm_state(2, {}))
    deleting = await scrape(client)
    assert value(deleting, "tofu_qemu_vms", project="lab", phase="Pending") == 1
    assert value(deleting, "tofu_qemu_memory_requested_bytes", project="lab") is None

    await VMStatusWriter(db).finalize(record["metadata"]["uid"])
    gone = await scrape(client)
    assert {dict(labels)["project"] for labels in series(gone, "tofu_qemu_vms")} == {"other"}


async def test_state_writes_are_counted_per_project(client: Client) -> None:
    """Each accepted POST/PUT of a state moves tofu_qemu_state_writes_total for its project."""
    await post_state(client, "lab", vm_state(1, {}))
    await post_state(client, "lab", vm_state(2, {}))
    samples = await scrape(client)
    assert value(samples, "tofu_qemu_state_writes_total", project="lab") == 2


async def test_lock_conflicts_are_counted(client: Client) -> None:
    """A LOCK answered 423 moves tofu_qemu_lock_conflicts_total; the holder's own LOCK does not."""
    lock = "/state/lab/lock"
    for lock_id, expected in (("holder", 200), ("holder", 200), ("other", 423)):
        response = await client.request("LOCK", lock, data=json.dumps({"ID": lock_id}), headers=AUTH)
        assert response.status == expected
    samples = await scrape(client)
    assert value(samples, "tofu_qemu_lock_conflicts_total", project="lab") == 1


async def test_a_slow_store_still_serves_the_other_metrics(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the store does not answer in time the scrape succeeds and counts the stale refresh."""

    async def hang(_self: StoreMetrics) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(metrics_handler, "STORE_REFRESH_TIMEOUT_SECONDS", 0.01)
    monkeypatch.setattr(StoreMetrics, "refresh", hang)
    samples = await scrape(client)
    assert value(samples, "tofu_qemu_store_metrics_refresh_errors_total") == 1
    assert value(samples, "controller_runtime_reconcile_errors_total", controller="qemuvm") == 0


async def test_the_ops_app_serves_the_same_metrics(aiohttp_client: ClientFactory, db: Database) -> None:
    """The controller's ops server serves a shared Metrics with the store's gauges, behind auth."""
    metrics = Metrics()
    metrics.reconcile_total.labels(controller=CONTROLLER_NAME, result="success").inc()
    client = await aiohttp_client(
        create_ops_app(metrics=metrics, database=db, credentials=CREDENTIALS, readiness_checks={})
    )
    assert (await client.get("/metrics")).status == 401
    samples = await scrape(client)
    assert value(samples, "controller_runtime_reconcile_total", controller="qemuvm", result="success") == 1
    assert value(samples, "tofu_qemu_host_ports_in_use") == 0


def test_two_metrics_in_one_process_do_not_clash() -> None:
    """Each Metrics has its own registry, so a second one registers the same names without error."""
    first, second = Metrics(), Metrics()
    first.state_writes_total.labels(project="lab").inc()
    assert second.registry.get_sample_value("tofu_qemu_state_writes_total", {"project": "lab"}) is None


async def test_one_metrics_exports_one_store(db: Database, tmp_path: Path) -> None:
    """Attaching the same store again is a no-op; attaching a second store is refused."""
    metrics = Metrics()
    assert attach_store_metrics(metrics, db) is attach_store_metrics(metrics, db)
    other = await open_database(tmp_path / "other")
    try:
        with pytest.raises(ValueError, match="another store"):
            attach_store_metrics(metrics, other)
    finally:
        await other.close()
