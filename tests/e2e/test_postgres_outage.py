"""PostgreSQL outages under a split host: 1 `tofu-qemu api` and 1 `tofu-qemu controller`
(host `outage-a`) on a private PostgreSQL cluster, real Terraform and one real QEMU guest (TCG).

- PostgreSQL restarted: the VM keeps its QEMU (same pid) and the next `terraform apply` works.
- PostgreSQL down for a while: every route that needs the store answers 503 with a JSON
  `Status` (never a 500), both /readyz report the store down, a `terraform apply` started
  during the outage retries and succeeds once PostgreSQL is back, the api and the controller
  reconnect by themselves (the pool, and the dedicated LISTEN connections), and the VM keeps
  running throughout.
- The controller's host name on its spans (resource `host.name`), every log line and the per-VM
  metrics, read back from a loopback OTLP receiver, its log file and its live /metrics.

One QEMU for the module; the tests run in file order on it.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from api.infra.health import CHECK_TIMEOUT_SECONDS
from api.server.health import STORE_DOWN
from api.testing.waiting import wait_until
from tests.e2e.conftest import open_vm_host
from tests.e2e.harness import (
    Fleet,
    GuestVM,
    HttpAnswer,
    ServerProcess,
    VmHost,
    free_loopback_port,
    http_request,
    running_identity,
)
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, find
from tests.postgres import PostgresCluster

pytestmark = pytest.mark.e2e

PROJECT = "outage"
HOST = "outage-a"
# Longer than the outages below: a controller cut off past its lease fences itself (kills its
# QEMUs, docs/multi-host.md), which these tests must not trigger. The default is 15 s.
LEASE_SECONDS = 30.0
# PostgreSQL stays down at least this long in the "for a while" case: longer than the pool's
# wait for a connection (CONNECT_TIMEOUT_SECONDS, 5 s), so requests time out rather than retry.
OUTAGE_SECONDS = 6.0
RECOVERY_SECONDS = 60.0
# Every write of the API is seen by the controller through its LISTEN connection within 1 s; the
# resync (30 s) would pick it up anyway. A change converged well before a resync proves the
# listener came back; the margin is for a loaded machine.
CONVERGE_AFTER_APPLY_SECONDS = 20.0
# /readyz's reasons for a store that is down: the probe's, or its deadline's when the probe
# waits longer for a connection than /readyz waits for it.
NO_ANSWER = f"no answer within {CHECK_TIMEOUT_SECONDS:g}s"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Split:
    """The module's processes: the api, the controller (with its ops listener) and the VM."""

    cluster: PostgresCluster
    url: str
    host: VmHost
    api: ServerProcess
    controller: ServerProcess
    ops_url: str
    fleet: Fleet
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
def split(
    tmp_path_factory: pytest.TempPathFactory, guest_images: Path, accel_cache: Path, terraform_bin: str
) -> Iterator[Split]:
    cluster = PostgresCluster()
    host = open_vm_host(tmp_path_factory, guest_images, accel_cache)
    receiver = OtlpReceiver()
    try:
        cluster.start()
        url = cluster.create_database()
        api = host.start("api", extra_args=("--database-url", url))
        ops = f"127.0.0.1:{free_loopback_port()}"
        controller = host.server(
            "controller",
            extra_args=(
                "--database-url", url,
                "--host-name", HOST,
                "--host-lease-seconds", str(LEASE_SECONDS),
                "--ops-listen", ops,
                "--otlp-endpoint", receiver.endpoint,
                "--usage-sample-seconds", "1",
            ),
        )  # fmt: skip
        controller.extra_env["OTEL_BSP_SCHEDULE_DELAY"] = "200"
        controller.start()
        fleet = Fleet(host, terraform_bin, project=PROJECT)
        fleet.init()
        fleet.apply({"alpha": GuestVM(memory=128)})
        fleet.wait_running("alpha", timeout=120)
        yield Split(cluster, url, host, api, controller, f"http://{ops}", fleet, receiver)
    finally:
        host.close()
        receiver.close()
        cluster.remove()


def test_restarting_postgres_keeps_the_vm_and_the_next_apply_works(split: Split) -> None:
    vm = split.fleet.vm("alpha")
    assert vm["status"]["host"] == HOST
    qemu = running_identity(vm["status"]["pid"])

    split.cluster.stop()
    split.cluster.start()
    split.fleet.apply({"alpha": GuestVM(memory=128, labels={"after": "restart"})})

    relabelled = split.fleet.wait_vm(
        "alpha", lambda v: v["status"].get("observedGeneration") == 2, what="gen 2"
    )
    assert relabelled["status"]["pid"] == vm["status"]["pid"], "restarting PostgreSQL restarted the VM"
    assert qemu.is_running
    assert relabelled["status"]["restarts"] == vm["status"]["restarts"]


def test_postgres_down_for_a_while_is_503_everywhere_then_everything_resumes(split: Split) -> None:
    vm = split.fleet.vm("alpha")
    qemu = running_identity(vm["status"]["pid"])
    generation = vm["metadata"]["generation"]

    split.cluster.stop()
    stopped_at = time.monotonic()
    attempts: dict[str, Callable[[], HttpAnswer]] = {
        "read the state": lambda: split.api.request("GET", f"/state/{PROJECT}"),
        "lock the state": lambda: split.api.lock(PROJECT, "during-the-outage"),
        "list the VMs": lambda: split.api.request("GET", f"/api/v1/projects/{PROJECT}/vms"),
        "list the hosts": lambda: split.api.request("GET", "/api/v1/hosts"),
        "cordon": lambda: split.api.request("POST", f"/api/v1/hosts/{HOST}/cordon"),
        "api readyz": lambda: split.api.request("GET", "/readyz", auth=None),
        "controller readyz": lambda: ops_get(split, "/readyz"),
    }
    # Terraform's http backend retries a 503 (retry_max 2, from 1 s): an apply that meets the
    # outage succeeds once PostgreSQL is back, with no state lost. Each answer takes up to the
    # pool's 5 s wait for a connection, so everything is asked at once.
    with ThreadPoolExecutor(max_workers=len(attempts) + 1) as pool:
        refused_before = refusals(split.api)
        applying = pool.submit(split.fleet.apply, {"alpha": GuestVM(memory=128, labels={"after": "outage"})})
        answers = dict(zip(attempts, pool.map(lambda attempt: attempt(), attempts.values()), strict=True))
        for what, answer in answers.items():
            assert_unavailable(answer, what, database_port=split.cluster.port)
        wait_until(
            lambda: refusals(split.api) > refused_before, timeout=30, what="Terraform to meet the outage"
        )
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped_at)))
        assert qemu.is_running, "an outage of PostgreSQL stopped the VM"
        print(f"503s and Terraform's first refusal {time.monotonic() - stopped_at:.1f} s into the outage")
        split.cluster.start()
        started_at = time.monotonic()
        applied = applying.result(timeout=120)
    assert applied.returncode == 0, applied.describe()
    print(f"terraform apply done {time.monotonic() - started_at:.1f} s after PostgreSQL started")

    converged = split.fleet.wait_vm(
        "alpha",
        lambda v: v["status"].get("observedGeneration") == generation + 1,
        what="the apply after the outage converged",
        timeout=CONVERGE_AFTER_APPLY_SECONDS,
    )
    print(f"converged {time.monotonic() - started_at:.1f} s after PostgreSQL started")
    assert converged["status"]["pid"] == vm["status"]["pid"]
    assert qemu.is_running
    assert split.api.request("GET", "/readyz", auth=None).status == 200
    wait_until(
        lambda: ops_get(split, "/readyz").status == 200, timeout=RECOVERY_SECONDS, what="controller ready"
    )
    # The dedicated LISTEN connections are back: the change feed of the api and the controller,
    # and the controller's placement wake-ups.
    wait_until(
        lambda: listeners(split.url) == {"tofu_qemu_changes": 2, "tofu_qemu_placements": 1},
        timeout=RECOVERY_SECONDS,
        what="the LISTEN connections to come back",
        describe=lambda: str(listeners(split.url)),
    )
    print(f"LISTEN connections back {time.monotonic() - started_at:.1f} s after PostgreSQL started")
    # The controller renews its lease again (database clock).
    renewed = wait_until(
        lambda: renewed_recently(host_row(split)),
        timeout=LEASE_SECONDS,
        what="a lease renewal after the outage",
    )
    assert renewed["vms"] == 1
    print(f"lease renewed {time.monotonic() - started_at:.1f} s after PostgreSQL started")


def test_the_host_name_is_on_spans_log_lines_and_per_vm_metrics(split: Split) -> None:
    uid = split.fleet.vm("alpha")["metadata"]["uid"]
    spans: list[ReceivedSpan] = split.receiver.wait_for(
        lambda s: find(s, "reconcile QemuVM"), timeout=30, what="a reconcile span"
    )
    assert {span.resource.get("host.name") for span in spans} == {HOST}
    assert {span.resource.get("host.name") for span in split.receiver.spans()} == {HOST}

    lines = [json.loads(line) for line in split.controller.log_text().splitlines() if line.startswith("{")]
    assert len(lines) > 20
    assert [line for line in lines if line.get("host") != HOST] == []
    # The api is no host: its lines carry none.
    api_lines = [json.loads(line) for line in split.api.log_text().splitlines() if line.startswith("{")]
    assert [line for line in api_lines if "host" in line] == []

    # The usage metering's series, one per running VM (docs/usage.md).
    per_vm = ("cpu_seconds_total", "memory_mib_seconds_total", "uptime_seconds_total", "disk_bytes")
    series = re.compile(rf"^(tofu_qemu_vm_(?:{'|'.join(per_vm)}))\{{([^}}]*)\}} ", re.MULTILINE)

    def vm_series() -> dict[str, str] | None:
        found = dict(series.findall(ops_get(split, "/metrics").body.decode()))
        return found if len(found) == len(per_vm) else None

    found = wait_until(vm_series, timeout=30, what="the tofu_qemu_vm_* series")
    for name, labels in found.items():
        assert f'host="{HOST}"' in labels, (name, labels)
        assert f'uid="{uid}"' in labels, (name, labels)


# ---- helpers --------------------------------------------------------------------------------


def assert_unavailable(answer: HttpAnswer, what: str, *, database_port: int) -> None:
    """A 503 `Status`: the routes' own, or a probe's, which adds what failed (and must name no
    address of the database: probes need no credentials)."""
    assert answer.status == 503, (what, answer.status, answer.body[:300])
    body = answer.json()
    assert (body["kind"], body["code"]) == ("Status", 503), what
    if "failed" in body:
        assert "database" in body["failed"], (what, body)
        assert body["failed"]["database"] in (STORE_DOWN, NO_ANSWER), body
        assert str(database_port) not in answer.body.decode(), (what, body)
    else:
        assert body["reason"] == "ServiceUnavailable", what
        assert "database cannot be reached" in body["message"], what


def ops_get(split: Split, path: str) -> HttpAnswer:
    return http_request(_DIRECT, split.ops_url + path, "GET", auth=None)


def refusals(api: ServerProcess) -> int:
    """The api's `store_unavailable` log lines for the state's routes so far."""
    return sum(
        '"store_unavailable"' in line and f'"/state/{PROJECT}' in line for line in api.log_text().splitlines()
    )


def listeners(url: str) -> dict[str, int]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'"
        ).fetchall()
    counts: dict[str, int] = {}
    for (query,) in rows:
        channel = query.split(None, 1)[1].strip('"')
        counts[channel] = counts.get(channel, 0) + 1
    return counts


def host_row(split: Split) -> dict[str, Any]:
    answer = split.api.request("GET", "/api/v1/hosts")
    assert answer.status == 200, answer.body
    (row,) = [h for h in answer.json()["items"] if h["name"] == HOST]
    return dict(row)


def renewed_recently(host: dict[str, Any]) -> dict[str, Any] | None:
    """`host` when Ready and renewed within one renewal period (plus slack); PostgreSQL runs on
    this machine's clock."""
    age = time.time() - datetime.fromisoformat(host["leaseRenewedAt"]).timestamp()
    return host if host["ready"] and age < LEASE_SECONDS / 3 + 2 else None
