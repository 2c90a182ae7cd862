"""Part 2 of hack/bench/backend: request latency under concurrency, with GET /healthz as the
in-run baseline.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import itertools
import json
import math
import statistics
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

import aiohttp
from _common import BenchError, basic_auth, progress

from api.tfstate import extract_vms, parse_state
from backendlib.common import (
    GET_TARGET_P99_MS,
    HTTP_TIMEOUT_S,
    LATENCY_PROJECT,
    LATENCY_SETTLE_CAP_S,
    MEMORY_CREATE,
    POST_TARGET_CPU_MS,
    POST_TARGET_P99_MS,
    Cpu,
    Server,
)


@dataclasses.dataclass(frozen=True, slots=True)
class SyntheticState:
    """A state body split around its serial, so that each write can carry a new serial."""

    head: bytes
    tail: bytes
    vm_count: int

    def body(self, serial: int) -> bytes:
        return self.head + str(serial).encode() + self.tail


def terraform_instance(index: int, memory: int) -> dict[str, Any]:
    """One `terraform_data.vm[index]` instance, with keys in the order Terraform 1.11 writes.

    The manifest is part 1's plus `runStrategy = "Halted"`: the backend parses and validates it
    exactly the same, but the controller (with `serve`) has no port to allocate and nothing to
    boot, so it stays out of the latency measurements after writing each VM's first status.
    """
    value = {
        "apiVersion": "tofu-qemu.dev/v1alpha1",
        "kind": "QemuVM",
        "metadata": {"name": f"vm-{index}"},
        "spec": {
            "boot": {"kernel": "tiny-guest/vmlinuz"},
            "memory": memory,
            "network": {"forwards": [{"guestPort": 80}]},
            "runStrategy": "Halted",
        },
    }
    cty_type = [
        "object",
        {
            "apiVersion": "string",
            "kind": "string",
            "metadata": ["object", {"name": "string"}],
            "spec": [
                "object",
                {
                    "boot": ["object", {"kernel": "string"}],
                    "memory": "number",
                    "network": ["object", {"forwards": ["tuple", [["object", {"guestPort": "number"}]]]}],
                    "runStrategy": "string",
                },
            ],
        },
    ]
    dynamic = {"value": value, "type": cty_type}
    return {
        "index_key": index,
        "schema_version": 0,
        "attributes": {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"tofu-qemu-bench/{index}")),
            "input": dynamic,
            "output": dynamic,
            "triggers_replace": None,
        },
        "sensitive_attributes": [],
    }


def synthetic_state(count: int) -> SyntheticState:
    marker = 987654321987654321
    document = {
        "version": 4,
        "terraform_version": "1.11.4",
        "serial": marker,
        "lineage": str(uuid.uuid5(uuid.NAMESPACE_URL, "tofu-qemu-bench/lineage")),
        "outputs": {},
        "resources": [
            {
                "mode": "managed",
                "type": "terraform_data",
                "name": "vm",
                "provider": 'provider["terraform.io/builtin/terraform"]',
                "instances": [terraform_instance(i, MEMORY_CREATE) for i in range(count)],
            }
        ],
        "check_results": None,
    }
    text = json.dumps(document, indent=2) + "\n"
    head, tail = text.encode().split(str(marker).encode())
    return SyntheticState(head=head, tail=tail, vm_count=count)


def state_of_size(target_bytes: int) -> SyntheticState:
    """The smallest count-N state whose body is at least `target_bytes`, checked to be valid."""
    one, two = synthetic_state(1), synthetic_state(2)
    per_instance = len(two.body(1)) - len(one.body(1))
    overhead = len(one.body(1)) - per_instance
    state = synthetic_state(max(1, math.ceil((target_bytes - overhead) / per_instance)))
    extraction = extract_vms(parse_state(state.body(1)).document)
    if len(extraction.vms) != state.vm_count or any(vm.error for vm in extraction.vms):
        raise BenchError("the synthetic state does not extract to valid VMs; fix terraform_instance()")
    return state


@dataclasses.dataclass(slots=True)
class LatencyRow:
    name: str
    concurrency: int
    samples_ms: list[float]
    wall_s: float
    cpu: Cpu
    target_ms: float | None
    baseline: LatencyRow | None = None
    cpu_target_ms: float | None = None
    # Which code the server ran: "" for this tree, "before" for --baseline-tree.
    tree: str = ""

    def percentile(self, pct: float) -> float:
        """Nearest-rank percentile."""
        ordered = sorted(self.samples_ms)
        return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]

    @property
    def passed(self) -> bool | None:
        if self.target_ms is None:
            return None
        cpu_ok = self.cpu_target_ms is None or self.cpu_ms_per_request <= self.cpu_target_ms
        return self.percentile(99) <= self.target_ms and cpu_ok

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu.server * 1000 / len(self.samples_ms)

    @property
    def target_text(self) -> str:
        if self.target_ms is None:
            return "-"
        cpu = f", <={self.cpu_target_ms:g} ms CPU" if self.cpu_target_ms is not None else ""
        return f"p99 <= {self.target_ms:g} ms{cpu}"

    def versus_baseline(self, pct: float) -> float:
        return self.percentile(pct) / self.baseline.percentile(pct) if self.baseline else math.nan

    def to_json(self) -> dict[str, Any]:
        requests = len(self.samples_ms)
        return {
            "name": self.name,
            "tree": self.tree or "this",
            "concurrency": self.concurrency,
            "requests": requests,
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
            "max_ms": max(self.samples_ms),
            "mean_ms": statistics.fmean(self.samples_ms),
            "throughput_rps": requests / self.wall_s,
            "server_cpu_ms_per_request": self.cpu.server * 1000 / requests,
            "server_cpu_cores": self.cpu.server / self.wall_s,
            "server_sys_cpu_cores": self.cpu.server_sys / self.wall_s,
            "bench_cpu_cores": self.cpu.bench / self.wall_s,
            "foreign_cpu_cores": self.cpu.foreign / self.wall_s,
            "p50_vs_baseline": self.versus_baseline(50),
            "p99_vs_baseline": self.versus_baseline(99),
            "target_p99_ms_max": self.target_ms,
            "target_server_cpu_ms_max": self.cpu_target_ms,
            "pass": self.passed,
            "samples_ms": self.samples_ms,
        }


RequestFn = Callable[[aiohttp.ClientSession], Coroutine[Any, Any, float]]


@dataclasses.dataclass(frozen=True, slots=True)
class Phase:
    name: str
    request: RequestFn
    clients: int
    requests: int
    target_ms: float | None
    cpu_target_ms: float | None = None


async def run_phase(
    session: aiohttp.ClientSession, phase: Phase, server: Server, *, max_seconds: float
) -> LatencyRow:
    """2 x clients discarded warm-up requests, then `phase.requests` from `phase.clients` workers.

    No request is started after `max_seconds` (0: no limit), which bounds the run time when the
    server is slow; the row then holds fewer samples.
    """
    for _ in range(2):
        async with asyncio.TaskGroup() as group:
            for _ in range(phase.clients):
                group.create_task(phase.request(session))
    tickets = itertools.count()
    samples: list[float] = []

    async def worker() -> None:
        while next(tickets) < phase.requests and time.perf_counter() < deadline:
            samples.append(await phase.request(session) * 1000)

    cpu_before = Cpu.take(server)
    started = time.perf_counter()
    deadline = started + max_seconds if max_seconds > 0 else math.inf
    async with asyncio.TaskGroup() as group:
        for _ in range(phase.clients):
            group.create_task(worker())
    wall = time.perf_counter() - started
    cpu = Cpu.take(server) - cpu_before
    return LatencyRow(
        phase.name, phase.clients, samples, wall, cpu, phase.target_ms, cpu_target_ms=phase.cpu_target_ms
    )


def timed_get(url: str, *, auth: bool) -> RequestFn:
    headers = {"Authorization": basic_auth()} if auth else {}

    async def request(session: aiohttp.ClientSession) -> float:
        started = time.perf_counter()
        async with session.get(url, headers=headers) as response:
            await response.read()
            elapsed = time.perf_counter() - started
            if response.status != 200:
                raise BenchError(f"GET {url} answered {response.status}")
        return elapsed

    return request


def timed_post(url: str, state: SyntheticState, serials: Iterator[int]) -> RequestFn:
    async def request(session: aiohttp.ClientSession) -> float:
        # The body and its MD5 are built before the clock starts: that is client work.
        body = state.body(next(serials))
        headers = {
            "Authorization": basic_auth(),
            "Content-Type": "application/json",
            "Content-MD5": base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode(),
        }
        started = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            elapsed = time.perf_counter() - started
            if response.status != 200:
                raise BenchError(f"POST {url} answered {response.status}: {await response.text()}")
        return elapsed

    return request


def spread_posts(server: Server, state: SyntheticState, serials: Iterator[int], projects: int) -> RequestFn:
    """POSTs taking turns over `projects` projects (LATENCY_PROJECT first): writes to different
    projects need not wait for each other's lock, as one project's do by protocol."""
    names = [LATENCY_PROJECT] + [f"{LATENCY_PROJECT}-{number}" for number in range(2, projects + 1)]
    posts = itertools.cycle([timed_post(server.state_url(name), state, serials) for name in names])

    async def request(session: aiohttp.ClientSession) -> float:
        return await next(posts)(session)

    return request


async def bench_latency(
    server: Server,
    state: SyntheticState,
    *,
    total: int,
    concurrency: int,
    serial_requests: int,
    max_phase_seconds: float,
    post_projects: int = 1,
) -> list[LatencyRow]:
    url = server.state_url(LATENCY_PROJECT)
    serials = itertools.count(1)
    healthz = timed_get(server.base_url + "/healthz", auth=False)
    get = timed_get(url, auth=True)
    post = spread_posts(server, state, serials, post_projects)
    phases = [
        Phase("GET /healthz", healthz, concurrency, total, None),
        Phase("GET state", get, concurrency, total, GET_TARGET_P99_MS),
        Phase("POST state", post, concurrency, total, POST_TARGET_P99_MS, POST_TARGET_CPU_MS),
    ]
    if serial_requests > 0:
        phases += [
            Phase("GET /healthz", healthz, 1, serial_requests, None),
            Phase("GET state", get, 1, serial_requests, None),
            Phase("POST state", post, 1, serial_requests, None),
        ]
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    rows: list[LatencyRow] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(post_projects):
            await post(session)  # the GETs need a state to read; each project its VMs
        # Let the controller (with `serve`) reconcile the VMs that write published (capped).
        settle_s = await asyncio.to_thread(server.wait_idle, limit=LATENCY_SETTLE_CAP_S)
        busy = " (still busy)" if settle_s >= LATENCY_SETTLE_CAP_S else ""
        progress(f"latency: server idle after {settle_s:.1f} s{busy}, having published {state.vm_count} VMs")
        for phase in phases:
            progress(f"latency: {phase.name}, {phase.clients} client(s), {phase.requests} requests")
            row = await run_phase(session, phase, server, max_seconds=max_phase_seconds)
            if len(row.samples_ms) < phase.requests:
                progress(
                    f"latency: stopped after {max_phase_seconds:g} s with {len(row.samples_ms)} requests"
                )
            rows.append(row)
    for row in rows:
        row.baseline = next(r for r in rows if r.name == "GET /healthz" and r.concurrency == row.concurrency)
    return rows


def post_mode(projects: int) -> str:
    where = f"one project ({LATENCY_PROJECT})" if projects == 1 else f"{projects} projects in turn"
    return f"POSTs go to {where} without a lock, so each is also published"


def print_latency(rows: Sequence[LatencyRow], *, state: SyntheticState, post_projects: int = 1) -> None:
    print(
        f"Part 2: request latency with a {len(state.body(1)):,} B state ({state.vm_count} QemuVMs); "
        f"{post_mode(post_projects)};\n"
        f"targets: GET p99 <= {GET_TARGET_P99_MS:g} ms; POST p99 <= {POST_TARGET_P99_MS:g} ms and <= "
        f"{POST_TARGET_CPU_MS:g} ms of server CPU each; baseline: GET /healthz (no auth) at the same "
        "concurrency;\nCPU columns are in cores during the measured requests: server (and its system "
        "part), this script (the clients), and foreign CPU (anything else)"
    )
    print(
        f"{'tree':<6} {'endpoint':<12} {'clients':>7} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'req/s':>7} {'p50/base':>8} {'p99/base':>8}  {'target':<10} "
        f"{'srv CPU ms/req':>14} {'srv':>5} {'sys':>5} {'bench':>5} {'foreign':>7}"
    )
    for row in rows:
        figures = row.to_json()
        verdict = {True: "PASS", False: "MISS", None: "-"}[row.passed]
        if row.baseline is row:
            verdict = "(baseline)"
        print(
            f"{row.tree or 'this':<6} {row.name:<12} {row.concurrency:>7} {figures['requests']:>5} "
            f"{figures['p50_ms']:>8.2f} "
            f"{figures['p95_ms']:>8.2f} {figures['p99_ms']:>8.2f} {figures['max_ms']:>8.2f} "
            f"{figures['throughput_rps']:>7.1f} {figures['p50_vs_baseline']:>7.1f}x "
            f"{figures['p99_vs_baseline']:>7.1f}x  {verdict:<10} "
            f"{figures['server_cpu_ms_per_request']:>14.2f} {figures['server_cpu_cores']:>5.2f} "
            f"{figures['server_sys_cpu_cores']:>5.2f} {figures['bench_cpu_cores']:>5.2f} "
            f"{figures['foreign_cpu_cores']:>7.2f}"
        )
