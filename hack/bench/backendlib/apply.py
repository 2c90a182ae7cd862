"""Part 1 of hack/bench/backend: terraform apply, the local backend against the http backend."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import BenchError, progress

from backendlib.common import (
    APPLY_SUMMARY_RE,
    APPLY_TARGET_RATIO,
    BENCH_PROJECT,
    CATCH_UP_CAP_S,
    CONFIG_TEMPLATE,
    MEMORY_CHANGE,
    MEMORY_CREATE,
    PASSWORD,
    TERRAFORM_TIMEOUT_S,
    USER,
    Cpu,
    Server,
    running_server,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Timed:
    """One timed command: its wall time, the CPU used meanwhile, and how long the server took
    to go idle after it (the controller's catch-up with `serve`; not part of the wall time;
    measured after creates only)."""

    wall_s: float
    cpu: Cpu
    catch_up_s: float = 0.0

    @property
    def foreign_share(self) -> float:
        """Other load on the machine, in cores, while this ran."""
        return self.cpu.foreign / self.wall_s


@dataclasses.dataclass(slots=True)
class ApplyRow:
    count: int
    operation: str
    local: list[Timed] = dataclasses.field(default_factory=list)
    http: list[Timed] = dataclasses.field(default_factory=list)

    @property
    def local_median_s(self) -> float:
        return statistics.median(t.wall_s for t in self.local)

    @property
    def http_median_s(self) -> float:
        return statistics.median(t.wall_s for t in self.http)

    @property
    def server_cpu_median_s(self) -> float:
        return statistics.median(t.cpu.server for t in self.http)

    @property
    def terraform_cpu_median_s(self) -> tuple[float, float]:
        """Median CPU seconds of the Terraform process, with the local and the http backend."""
        return (
            statistics.median(t.cpu.children for t in self.local),
            statistics.median(t.cpu.children for t in self.http),
        )

    @property
    def catch_up_median_s(self) -> float:
        return statistics.median(t.catch_up_s for t in self.http)

    @property
    def foreign_share_max(self) -> float:
        return max(t.foreign_share for t in (*self.local, *self.http))

    @property
    def ratio(self) -> float:
        return self.http_median_s / self.local_median_s

    @property
    def passed(self) -> bool:
        return self.ratio <= APPLY_TARGET_RATIO

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "operation": self.operation,
            "local_s": [t.wall_s for t in self.local],
            "http_s": [t.wall_s for t in self.http],
            "http_server_cpu_s": [t.cpu.server for t in self.http],
            "http_server_catch_up_s": [t.catch_up_s for t in self.http],
            "local_terraform_cpu_s": [t.cpu.children for t in self.local],
            "http_terraform_cpu_s": [t.cpu.children for t in self.http],
            "foreign_cpu_cores": [t.foreign_share for t in (*self.local, *self.http)],
            "local_median_s": self.local_median_s,
            "http_median_s": self.http_median_s,
            "http_server_cpu_median_s": self.server_cpu_median_s,
            "ratio_http_over_local": self.ratio,
            "target_ratio_max": APPLY_TARGET_RATIO,
            "pass": self.passed,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Terraform:
    binary: str
    cli_config: Path

    def env(self, server: Server | None, project: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("TF_", "CHECKPOINT"))}
        env |= {
            "CHECKPOINT_DISABLE": "1",
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            "TF_CLI_CONFIG_FILE": str(self.cli_config),
        }
        if server is not None:
            # An empty `backend "http" {}` configured from the environment
            # (docs/backend.md#configuring-the-client).
            env |= {
                "TF_HTTP_ADDRESS": server.state_url(project),
                "TF_HTTP_LOCK_ADDRESS": server.state_url(project) + "/lock",
                "TF_HTTP_UNLOCK_ADDRESS": server.state_url(project) + "/lock",
                "TF_HTTP_USERNAME": USER,
                "TF_HTTP_PASSWORD": PASSWORD,
            }
        return env

    def run(
        self, workdir: Path, args: Sequence[str], env: dict[str, str], *, server: Server | None
    ) -> tuple[Timed, str]:
        """Run one command; return its timing and stdout. :raise BenchError: non-zero exit."""
        cpu_before = Cpu.take(server)
        started = time.perf_counter()
        try:
            done = subprocess.run(
                [self.binary, *args],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=TERRAFORM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise BenchError(f"terraform {' '.join(args)} timed out in {workdir}") from err
        elapsed = time.perf_counter() - started
        cpu = Cpu.take(server) - cpu_before
        if done.returncode != 0:
            raise BenchError(
                f"terraform {' '.join(args)} exited {done.returncode} in {workdir}:\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )
        return Timed(elapsed, cpu), done.stdout

    def version(self) -> str:
        done = subprocess.run(
            [self.binary, "version", "-json"],
            env=self.env(None, ""),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        try:
            return str(json.loads(done.stdout)["terraform_version"])
        except (ValueError, KeyError):
            return "unknown"


def apply_once(
    terraform: Terraform, workdir: Path, *, backend: str, count: int, server_command: str
) -> tuple[Timed, Timed]:
    """In a fresh dir: init (untimed), create N, then change all N. Returns both timings.

    An http run gets a server of its own, so that nothing is left over from an earlier run
    (VM objects, a controller still reconciling); a local run has no server running at all.
    """
    workdir.mkdir(parents=True)
    if backend == "local":
        return apply_pair(terraform, workdir, count=count, server=None)
    with running_server(workdir / "server", command=server_command) as server:
        return apply_pair(terraform, workdir, count=count, server=server)


def apply_pair(
    terraform: Terraform, workdir: Path, *, count: int, server: Server | None
) -> tuple[Timed, Timed]:
    backend = "local" if server is None else "http"
    config = CONFIG_TEMPLATE.format(backend=backend, memory=MEMORY_CREATE, count=count)
    (workdir / "main.tf").write_text(config)
    env = terraform.env(server, BENCH_PROJECT)
    terraform.run(workdir, ["init", "-input=false", "-no-color"], env, server=server)
    apply = ["apply", "-auto-approve", "-input=false", "-no-color"]
    create, out = terraform.run(workdir, [*apply, f"-var=memory={MEMORY_CREATE}"], env, server=server)
    expect_summary(out, added=count, changed=0, workdir=workdir)
    if server is not None:
        # Let the controller reconcile the new VMs before the next apply (capped; see catch-up).
        create = dataclasses.replace(create, catch_up_s=server.wait_idle(limit=CATCH_UP_CAP_S))
    change, out = terraform.run(workdir, [*apply, f"-var=memory={MEMORY_CHANGE}"], env, server=server)
    expect_summary(out, added=0, changed=count, workdir=workdir)
    if server is not None:
        check_published(server, BENCH_PROJECT, count)
    return create, change


def expect_summary(stdout: str, *, added: int, changed: int, workdir: Path) -> None:
    match = APPLY_SUMMARY_RE.search(stdout)
    got = (int(match[1]), int(match[2])) if match else None
    if got != (added, changed):
        raise BenchError(f"{workdir}: expected {added} added, {changed} changed; apply said {got}")


def check_published(server: Server, project: str, count: int) -> None:
    """Untimed: the applies really went through the server, and the lock was released."""
    info = server.call("GET", f"/api/v1/projects/{project}")
    if info["vmCount"] != count or info["lock"] is not None or info["pendingSerial"] is not None:
        raise BenchError(
            f"project {project}: expected {count} VMs, no lock and nothing pending; got "
            f"vmCount={info['vmCount']} lock={info['lock']} pendingSerial={info['pendingSerial']}"
        )


def bench_apply(
    terraform: Terraform, workdir: Path, *, counts: Sequence[int], repeat: int, server_command: str
) -> list[ApplyRow]:
    rows: list[ApplyRow] = []
    warm = min(*counts, 20)
    progress(f"apply: untimed warm-up of both backends at N={warm}")
    for backend in ("local", "http"):
        target = workdir / f"warmup-{backend}"
        apply_once(terraform, target, backend=backend, count=warm, server_command=server_command)
    for count in counts:
        create, change = ApplyRow(count, "create"), ApplyRow(count, "change all")
        for rep in range(1, repeat + 1):
            # Alternate which backend goes first, so slow drift (page cache, CPU clock) cancels.
            for backend in ("local", "http") if rep % 2 else ("http", "local"):
                target = workdir / f"n{count}-r{rep}-{backend}"
                created, changed = apply_once(
                    terraform, target, backend=backend, count=count, server_command=server_command
                )
                (create.http if backend == "http" else create.local).append(created)
                (change.http if backend == "http" else change.local).append(changed)
                catch_up = f", catch-up {created.catch_up_s:.1f} s" if backend == "http" else ""
                progress(
                    f"apply: N={count} rep {rep}/{repeat} {backend:5}: "
                    f"create {created.wall_s:.3f} s{catch_up}, change all {changed.wall_s:.3f} s"
                )
                shutil.rmtree(target, ignore_errors=True)
        rows += [create, change]
    return rows


def print_apply(rows: Sequence[ApplyRow], *, repeat: int, version: str) -> None:
    print(
        f"Part 1: Terraform {version} apply wall time, median of {repeat} (init not timed); "
        f"target: http/local <= {APPLY_TARGET_RATIO:.2f}\n"
        "CPU s are medians: Terraform's own (local / http backend) and the server's during the http "
        "apply; catch-up s: median time the server\nstayed busy after the http create returned (the "
        f"controller reconciling the new VMs; not in the wall time; waits stop at {CATCH_UP_CAP_S:.0f} s); "
        "foreign = the most CPU\nused by neither Terraform, the server nor this script "
        "(other processes, kernel writeback) during any run, in cores"
    )
    print(
        f"{'N':>5}  {'operation':<10}  {'local s':>8}  {'http s':>8}  {'http/local':>10}  "
        f"{'target':<6}  {'tf CPU s l/h':>13}  {'srv CPU s':>9}  {'catch-up s':>10}  {'foreign':>7}  "
        "local/http s per run"
    )
    for row in rows:
        runs = " ".join(f"{a.wall_s:.3f}/{b.wall_s:.3f}" for a, b in zip(row.local, row.http, strict=True))
        tf_local, tf_http = row.terraform_cpu_median_s
        catch_up = "-"
        if row.operation == "create":
            at_cap = row.catch_up_median_s >= CATCH_UP_CAP_S
            catch_up = f"{'>=' if at_cap else ''}{row.catch_up_median_s:.1f}"
        print(
            f"{row.count:>5}  {row.operation:<10}  {row.local_median_s:>8.3f}  {row.http_median_s:>8.3f}"
            f"  {row.ratio:>9.2f}x  {'PASS' if row.passed else 'MISS':<6}"
            f"  {f'{tf_local:.2f}/{tf_http:.2f}':>13}  {row.server_cpu_median_s:>9.3f}"
            f"  {catch_up:>10}"
            f"  {row.foreign_share_max:>7.2f}  {runs}"
        )
