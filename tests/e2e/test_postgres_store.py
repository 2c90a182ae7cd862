"""`tofu-qemu serve --database-url postgresql://...`: real Terraform and a real QEMU guest (TCG)
with every table in a private PostgreSQL cluster, which is restarted under the running VM."""

from __future__ import annotations

import psycopg
import pytest

from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    GUEST_BOOT_TIMEOUT,
    Fleet,
    GuestVM,
    get_guest_page,
    host_port,
    live_qemu_pids,
    running_identity,
)
from tests.e2e.test_store_driver import driver_files_mapped
from tests.postgres import PostgresCluster

pytestmark = pytest.mark.e2e

PROJECT = "postgres"


def rows(url: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as connection:
        return list(connection.execute(query))


def test_apply_restart_postgres_apply_destroy(
    own_postgres_cluster: PostgresCluster, make_vm_host: MakeVmHost, terraform_bin: str
) -> None:
    url = own_postgres_cluster.create_database()
    host = make_vm_host()
    server = host.start("serve", extra_args=["--database-url", url])
    # The driver a server on SQLite never loads (test_store_driver.py) is loaded here.
    assert server.pid is not None
    assert any("psycopg" in path for path in driver_files_mapped(server.pid))
    fleet = Fleet(host, terraform_bin, project=PROJECT)
    fleet.init()
    fleet.apply({"alpha": GuestVM(memory=128)})

    vm = fleet.wait_running("alpha")
    status, body = get_guest_page(host_port(vm), "/", timeout=GUEST_BOOT_TIMEOUT)
    assert (status, "<h1>alpha</h1>" in body) == (200, True), body
    # Every table is PostgreSQL's: the state, the VM object, its port; no SQLite file was made.
    assert rows(url, "SELECT name FROM projects") == [(PROJECT,)]
    assert rows(url, "SELECT name FROM vms") == [("alpha",)]
    assert len(rows(url, "SELECT host_port FROM port_allocations")) == 1
    assert not host.db_path.exists()

    qemu = running_identity(vm["status"]["pid"])
    own_postgres_cluster.stop()
    own_postgres_cluster.start()
    # The VM kept running through the restart, and the next apply (a label change) works.
    fleet.apply({"alpha": GuestVM(memory=128, labels={"after": "restart"})})
    relabelled = fleet.wait_vm(
        "alpha", lambda v: v["status"].get("observedGeneration") == 2, what="generation 2 observed"
    )
    assert relabelled["status"]["pid"] == vm["status"]["pid"]
    assert qemu.is_running, "restarting PostgreSQL must not restart the VM"

    fleet.terraform.run("destroy", "-auto-approve")
    host.wait_gone(PROJECT, "alpha")
    assert live_qemu_pids(host.data_dir) == set()
    assert rows(url, "SELECT uid FROM vms") == []
    assert rows(url, "SELECT uid FROM port_allocations") == []
    assert not host.db_path.exists()
