"""Part 3 of hack/bench/backend: a large state written, then listed, while /healthz is polled."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from _common import BenchError, basic_auth

from backendlib.common import (
    BIG_HEALTHZ_INTERVAL_S,
    BIG_HEALTHZ_TARGET_P99_MS,
    BIG_LIST_INTERVAL_S,
    BIG_LISTED_TARGET_S,
    BIG_PROJECT,
    BIG_TIMEOUT_S,
    LATENCY_SETTLE_CAP_S,
    Cpu,
    Server,
    percentile,
)
from backendlib.latency import SyntheticState, timed_post


@dataclasses.dataclass(slots=True)
class BigRow:
    tree: str
    vms: int
    state_bytes: int
    post_s: float
    listed_s: float
    second_post_s: float
    healthz_ms: list[float]
    healthz_during_post_ms: list[float]
    server_cpu_s: float
    foreign_cores: float

    @property
    def passed(self) -> bool:
        return (
            self.listed_s <= BIG_LISTED_TARGET_S
            and percentile(self.healthz_ms, 99) < BIG_HEALTHZ_TARGET_P99_MS
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "tree": self.tree or "this",
            "vms": self.vms,
            "state_bytes": self.state_bytes,
            "post_s": self.post_s,
            "listed_s": self.listed_s,
            "second_post_unchanged_s": self.second_post_s,
            "healthz_samples": len(self.healthz_ms),
            "healthz_p99_ms": percentile(self.healthz_ms, 99),
            "healthz_max_ms": max(self.healthz_ms, default=math.nan),
            "healthz_p99_during_post_ms": percentile(self.healthz_during_post_ms, 99),
            "server_cpu_s": self.server_cpu_s,
            "foreign_cpu_cores": self.foreign_cores,
            "pass": self.passed,
        }


async def poll_healthz(session: aiohttp.ClientSession, url: str, samples: list[tuple[float, float]]) -> None:
    """GET /healthz every BIG_HEALTHZ_INTERVAL_S until cancelled; (start, latency) pairs."""
    while True:
        samples.append(await healthz_once(session, url))
        await asyncio.sleep(BIG_HEALTHZ_INTERVAL_S)


async def healthz_once(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    started = time.perf_counter()
    async with session.get(url) as response:
        await response.read()
    return started, time.perf_counter() - started


async def listed_count(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url, headers={"Authorization": basic_auth()}) as response:
        if response.status != 200:
            raise BenchError(f"GET {url} answered {response.status}")
        return len((await response.json())["items"])


async def bench_big_state(server: Server, state: SyntheticState, *, tree: str) -> BigRow:
    post = timed_post(server.state_url(BIG_PROJECT), state, itertools.count(1))
    vms_url = f"{server.base_url}/api/v1/projects/{BIG_PROJECT}/vms"
    samples: list[tuple[float, float]] = []
    timeout = aiohttp.ClientTimeout(total=BIG_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session, asyncio.TaskGroup() as group:
        poller = group.create_task(poll_healthz(session, server.base_url + "/healthz", samples))
        await asyncio.sleep(1.0)  # a few samples before the write
        cpu_before = Cpu.take(server)
        started = time.perf_counter()
        post_s = await post(session)
        post_done = time.perf_counter()
        while await listed_count(session, vms_url) < state.vm_count:
            if time.perf_counter() - started > BIG_TIMEOUT_S:
                raise BenchError(f"{state.vm_count} VMs were not listed within {BIG_TIMEOUT_S:.0f} s")
            await asyncio.sleep(BIG_LIST_INTERVAL_S)
        listed_s = time.perf_counter() - started
        cpu = Cpu.take(server) - cpu_before
        poller.cancel()
        if not any(at >= started for at, _ in samples):
            # A small state is listed before the poller's next turn: the window needs a sample.
            samples.append(await healthz_once(session, server.base_url + "/healthz"))
    await asyncio.to_thread(server.wait_idle, limit=LATENCY_SETTLE_CAP_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        second_post_s = await post(session)
    window = [latency * 1000 for at, latency in samples if at >= started]
    during_post = [latency * 1000 for at, latency in samples if started <= at <= post_done]
    return BigRow(
        tree=tree,
        vms=state.vm_count,
        state_bytes=len(state.body(1)),
        post_s=post_s,
        listed_s=listed_s,
        second_post_s=second_post_s,
        healthz_ms=window,
        healthz_during_post_ms=during_post,
        server_cpu_s=cpu.server,
        foreign_cores=cpu.foreign / listed_s,
    )


def print_big(rows: Sequence[BigRow]) -> None:
    print(
        f"Part 3: a {rows[0].state_bytes:,} B state of {rows[0].vms:,} QemuVMs posted to a fresh server, "
        f"then listed (GET .../vms every {BIG_LIST_INTERVAL_S:g} s) while /healthz is requested every "
        f"{BIG_HEALTHZ_INTERVAL_S * 1000:g} ms;\ntargets: listed <= {BIG_LISTED_TARGET_S:g} s after the "
        f"POST started, /healthz p99 < {BIG_HEALTHZ_TARGET_P99_MS:g} ms meanwhile"
    )
    print(
        f"{'tree':<6} {'POST s':>7} {'listed s':>8} {'2nd POST s':>10} {'healthz n':>9} {'p99 ms':>7} "
        f"{'max ms':>7} {'p99 in POST':>11} {'srv CPU s':>9} {'foreign':>7}  verdict"
    )
    for row in rows:
        f = row.to_json()
        print(
            f"{f['tree']:<6} {row.post_s:>7.2f} {row.listed_s:>8.2f} {row.second_post_s:>10.2f} "
            f"{len(row.healthz_ms):>9} {f['healthz_p99_ms']:>7.1f} {f['healthz_max_ms']:>7.1f} "
            f"{f['healthz_p99_during_post_ms']:>11.1f} {row.server_cpu_s:>9.2f} {row.foreign_cores:>7.2f}  "
            f"{'PASS' if row.passed else 'MISS'}"
        )
