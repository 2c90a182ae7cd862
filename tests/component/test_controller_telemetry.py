"""The controller's traces and metrics, in-process with a stand-in QEMU that fails at start.

Spans go to an in-memory exporter on the process's TracerProvider (one per process, so it is
installed once for the session). The real OTLP path, with real QEMU and Terraform, is proven in
tests/e2e/test_observability.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.infra.logs import add_trace_context
from api.infra.metrics import Metrics
from api.testing.waiting import wait_until_async
from controller.manager import Controller
from controller.telemetry import RECONCILE_SPAN
from tests.component.test_controller_failures import SPEC, Harness, controller_on, fake_qemu

__all__ = ["fake_qemu"]  # a fixture used by this module's tests

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="session")
def _provider() -> TracerProvider:
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        provider = current
    else:
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    return provider


@pytest.fixture
def spans(_provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
async def traced(
    tmp_path: Path, fake_qemu: Path, spans: InMemorySpanExporter
) -> AsyncIterator[tuple[Harness, Metrics]]:
    """A running controller whose readiness checks all passed (loop alive, a resync finished,
    QEMU (the stand-in) on PATH)."""
    metrics = Metrics()

    async def not_ready_yet(controller: Controller) -> None:
        checks = controller.readiness_checks()
        assert await checks["resync"]() == "no full resync has finished yet"
        assert await checks["controller"]() == "the controller loop is not running"

    async with controller_on(tmp_path, metrics=metrics, before_start=not_ready_yet) as harness:
        await wait_until_async(
            _all_ready(harness.controller.readiness_checks()), lambda failures: not failures
        )
        yield harness, metrics


def _all_ready(checks: dict[str, Callable[[], Awaitable[str | None]]]) -> Callable[[], Awaitable[list[str]]]:
    async def failures() -> list[str]:
        return [reason for check in checks.values() if (reason := await check()) is not None]

    return failures


def reconciles_of(finished: Sequence[ReadableSpan], uid: str) -> list[ReadableSpan]:
    return [
        s for s in finished if s.name == RECONCILE_SPAN and (s.attributes or {}).get("tofu_qemu.uid") == uid
    ]


def children(finished: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in finished if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_reconcile_spans_link_to_the_write_and_hold_the_spawn(
    traced: tuple[Harness, Metrics], spans: InMemorySpanExporter
) -> None:
    """The write that set the generation is linked; the reconcile that spawned has a spawn child."""
    harness, _ = traced
    with trace.get_tracer("test").start_as_current_span("POST /state/{project}") as write_span:
        await harness.declare({"web": SPEC})
    uid, _ = await harness.status_of("web")
    await harness.wait_for("web", lambda s: s.failures >= 1)
    # Status is written inside the reconcile (its events are recorded after): wait for its span.
    await wait_until_async(
        lambda: any(
            c.name == "spawn"
            for r in reconciles_of(spans.get_finished_spans(), uid)
            for c in children(spans.get_finished_spans(), r)
        )
    )

    finished = spans.get_finished_spans()
    ours = reconciles_of(finished, uid)
    assert ours, [s.name for s in finished]
    assert all(s.parent is None for s in ours), "every reconcile is a root span"
    spawning = [r for r in ours if any(c.name == "spawn" for c in children(finished, r))]
    assert spawning
    first = spawning[0]
    attributes = first.attributes or {}
    assert attributes["tofu_qemu.project"] == "lab"
    assert attributes["tofu_qemu.vm"] == "web"
    assert attributes["tofu_qemu.generation"] == 1
    assert "Spawn" in tuple(attributes["tofu_qemu.actions"])  # type: ignore[arg-type]
    assert attributes["tofu_qemu.result"] in {"success", "requeue", "error"}
    [link] = first.links
    assert link.context.trace_id == write_span.get_span_context().trace_id
    assert link.context.span_id == write_span.get_span_context().span_id
    # The stand-in QEMU dies at once and a first failure restarts at once, in the same reconcile.
    for spawn in (c for c in children(finished, first) if c.name == "spawn"):
        assert len(str((spawn.attributes or {})["tofu_qemu.argv_digest"])) == 64
        assert spawn.context.trace_id == first.context.trace_id


async def test_a_failed_boot_ends_its_boot_span_with_an_error(
    traced: tuple[Harness, Metrics], spans: InMemorySpanExporter
) -> None:
    harness, _ = traced
    await harness.declare({"web": SPEC})
    uid, _ = await harness.status_of("web")
    await wait_until_async(lambda: any(s.name == "boot QemuVM" for s in spans.get_finished_spans()))
    boot = next(s for s in spans.get_finished_spans() if s.name == "boot QemuVM")
    assert (boot.attributes or {})["tofu_qemu.uid"] == uid
    assert boot.status.status_code is trace.StatusCode.ERROR


async def test_reconcile_and_workqueue_metrics_move(traced: tuple[Harness, Metrics]) -> None:
    harness, metrics = traced
    await harness.declare({"web": SPEC})
    await harness.wait_for("web", lambda s: s.failures >= 2)

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
    }

    def value(metric: str, **labels: str) -> float:
        return samples.get((metric, tuple(sorted(labels.items()))), 0.0)

    reconciles = sum(
        value("controller_runtime_reconcile_total", controller="qemuvm", result=result)
        for result in ("success", "error", "requeue", "requeue_after")
    )
    assert reconciles >= 2
    assert value("workqueue_adds_total", name="qemuvm") >= 2
    assert value("controller_runtime_reconcile_time_seconds_count", controller="qemuvm") == reconciles
    assert value("workqueue_work_duration_seconds_count", name="qemuvm") >= 2
    assert value("tofu_qemu_vm_restarts_total", reason="crashed") >= 1


def test_log_lines_inside_a_span_carry_its_ids(spans: InMemorySpanExporter) -> None:
    with trace.get_tracer("test").start_as_current_span("reconcile QemuVM") as span:
        event = add_trace_context(None, "info", {"event": "vm_spawned"})
    context = span.get_span_context()
    assert event["trace_id"] == format(context.trace_id, "032x")
    assert event["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in add_trace_context(None, "info", {"event": "outside"})
