"""E2E fixtures: real `tofu-qemu` processes, real QEMU and the real Terraform CLI.

One server serves the whole session; each test works in its own project (named after the test),
so tests do not see each other's states or locks. Tests that kill servers start their own with
`spawn_server`. Tests that run VMs get a `VmHost` (own data dir, the session's guest images) from
`make_vm_host`. Every server, and every QEMU of a VmHost, is killed at teardown, and a failing
test's report carries the log of every server it used and every VM's serial log.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ServerProcess, Terraform, VmHost, prepare_guest_images, terraform_env

TERRAFORM_PATHS = ("terraform", "/usr/local/bin/terraform")
LOG_TAIL_CHARS = 20_000
_ACTIVE_SERVERS = pytest.StashKey[list[ServerProcess]]()
_ACTIVE_HOSTS = pytest.StashKey[list[VmHost]]()

SpawnServer = Callable[[Path], ServerProcess]
MakeTerraform = Callable[..., Terraform]
MakeVmHost = Callable[[], VmHost]


@pytest.fixture(scope="session")
def terraform_bin() -> str:
    for candidate in TERRAFORM_PATHS:
        found = shutil.which(candidate)
        if found:
            return found
    pytest.skip("terraform is not installed")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The session's state backend (`tofu-qemu api`), on a free loopback port with a fresh data dir.

    API only: the tests that share it check what the store makes of Terraform's requests, and a
    controller would act on their VM objects meanwhile (finalize deleted ones, try to boot
    others). Tests of the controller run their own servers (`make_vm_host`).
    """
    root = tmp_path_factory.mktemp("server")
    process = ServerProcess(data_dir=root / "data", log_path=root / "server.log", command="api")
    try:
        process.start()
        yield process
    finally:
        process.kill()


@pytest.fixture
def spawn_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SpawnServer]:
    """Start servers of this test's own (restartable on the same data dir); all killed at teardown."""
    started: list[ServerProcess] = []
    request.node.stash[_ACTIVE_SERVERS] = started

    def spawn(data_dir: Path) -> ServerProcess:
        process = ServerProcess(data_dir=data_dir, log_path=tmp_path / f"server-{len(started)}.log")
        started.append(process)
        process.start()
        return process

    try:
        yield spawn
    finally:
        for process in started:
            process.kill()


@pytest.fixture(scope="session")
def guest_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An images dir holding tiny-guest/ (docs/guest.md); QEMU is installed first if missing."""
    images_dir = tmp_path_factory.mktemp("images")
    prepare_guest_images(images_dir)
    return images_dir


@pytest.fixture(scope="session")
def accel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One accelerator verdict file for every server: the KVM boot probe runs at most once."""
    return tmp_path_factory.mktemp("accel") / "accel.json"


def open_vm_host(tmp_path_factory: pytest.TempPathFactory, guest_images: Path, accel_cache: Path) -> VmHost:
    """A VmHost in a fresh tmp dir; the caller closes it."""
    return VmHost(tmp_path_factory.mktemp("h"), images_dir=guest_images, accel_cache=accel_cache)


def report_host_on_failure(request: pytest.FixtureRequest, host: VmHost) -> None:
    """Attach `host`'s server logs and serial logs to the current test's report if it fails."""
    hosts = request.node.stash.setdefault(_ACTIVE_HOSTS, [])
    if host not in hosts:
        hosts.append(host)


@pytest.fixture
def make_vm_host(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    guest_images: Path,
    accel_cache: Path,
) -> Iterator[MakeVmHost]:
    """`make_vm_host()`: a fresh data dir for servers and VMs; at teardown every server and every
    QEMU of it is killed."""
    hosts: list[VmHost] = []

    def make() -> VmHost:
        host = open_vm_host(tmp_path_factory, guest_images, accel_cache)
        hosts.append(host)
        report_host_on_failure(request, host)
        return host

    try:
        yield make
    finally:
        for host in hosts:
            host.close()


@pytest.fixture
def project(request: pytest.FixtureRequest) -> str:
    """A project name unique to this test."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)[:100]


@pytest.fixture
def make_terraform(terraform_bin: str, server: ServerProcess, project: str, tmp_path: Path) -> MakeTerraform:
    """`make_terraform(workdir, password=...)`: terraform in `workdir`, on this test's project."""

    def make(workdir: Path, *, password: str | None = None) -> Terraform:
        env = terraform_env(state_url=server.state_url(project), scratch=tmp_path / "tf-scratch")
        if password is not None:
            env["TF_HTTP_PASSWORD"] = password
        return Terraform(terraform_bin, workdir, env=env)

    return make


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the log of every server the test used (and its VMs' serial logs) to a failed report."""
    report = yield
    if report.failed:
        for host in item.stash.get(_ACTIVE_HOSTS, []):
            for title, text in host.diagnostics():
                report.sections.append((title, text[-LOG_TAIL_CHARS:]))
        servers: list[ServerProcess] = []
        if _ACTIVE_SERVERS in item.stash:
            spawned = item.stash[_ACTIVE_SERVERS]
            servers.extend(spawned)
        if isinstance(item, pytest.Function):
            shared = item.funcargs.get("server")
            if isinstance(shared, ServerProcess):
                servers.insert(0, shared)
        for process in servers:
            text = process.log_text()
            report.sections.append((f"tofu-qemu server log {process.log_path}", text[-LOG_TAIL_CHARS:]))
    return report
