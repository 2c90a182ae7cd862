"""The controller's traces and metrics: span names, the work queue's metrics, VM boot spans.

Span tree of one reconcile (the root is new for every reconcile; it links to the write that set
the generation it acts on):

    reconcile QemuVM
      ├─ ports allocate / ports release
      ├─ disk create / disk delete
      ├─ spawn                       (argv digest, pid)
      ├─ qmp cont / qmp query-status / qmp system_powerdown / qmp quit
      ├─ kill                        (signal)
      └─ clean runtime / remove runtime dir / finalize
    boot QemuVM                      (child of the spawn span; spawn -> QMP ready -> Ready)
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from api.infra.metrics import CONTROLLER_NAME, Metrics

TRACER = trace.get_tracer("tofu_qemu.controller")
RECONCILE_SPAN = "reconcile QemuVM"
BOOT_SPAN = "boot QemuVM"


class QueueMetrics:
    """client-go's workqueue metrics, fed by the WorkQueue (a QueueObserver)."""

    def __init__(self, metrics: Metrics) -> None:
        self._depth = metrics.workqueue_depth.labels(name=CONTROLLER_NAME)
        self._adds = metrics.workqueue_adds_total.labels(name=CONTROLLER_NAME)
        self._retries = metrics.workqueue_retries_total.labels(name=CONTROLLER_NAME)
        self._queued = metrics.workqueue_queue_duration_seconds.labels(name=CONTROLLER_NAME)
        self._worked = metrics.workqueue_work_duration_seconds.labels(name=CONTROLLER_NAME)

    def added(self, depth: int) -> None:
        self._adds.inc()
        self._depth.set(depth)

    def retried(self) -> None:
        self._retries.inc()

    def started(self, waited_seconds: float, depth: int) -> None:
        self._queued.observe(waited_seconds)
        self._depth.set(depth)

    def finished(self, worked_seconds: float) -> None:
        self._worked.observe(worked_seconds)


class BootSpans:
    """One open span per VM from its spawn until it is Ready, Paused or its process is gone.

    A boot outlives the reconcile that spawned it when QEMU is slow to answer QMP, so the span
    is kept here rather than in a `with` block. It also yields `tofu_qemu_vm_start_seconds`.
    """

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics
        self._open: dict[str, tuple[Span, float]] = {}

    def started(
        self, uid: str, *, pid: int, argv_digest: str, since: tuple[int, float] | None = None
    ) -> None:
        """`since`: when the spawn began (epoch ns, monotonic s), when it is told afterwards."""
        self.abandoned(uid, "spawned again")
        span = TRACER.start_span(
            BOOT_SPAN,
            attributes={"tofu_qemu.uid": uid, "process.pid": pid, "tofu_qemu.argv_digest": argv_digest},
            start_time=since[0] if since else None,
        )
        self._open[uid] = (span, since[1] if since else time.monotonic())

    def event(self, uid: str, name: str) -> None:
        opened = self._open.get(uid)
        if opened is not None:
            opened[0].add_event(name)

    def ready(self, uid: str) -> None:
        opened = self._open.pop(uid, None)
        if opened is None:
            return
        span, started = opened
        span.add_event("ready")
        span.end()
        if self._metrics is not None:
            self._metrics.vm_start_seconds.observe(time.monotonic() - started)

    def paused(self, uid: str) -> None:
        """The boot stops at a pause (startStrategy Paused, or a pause asked while booting): the
        span ends there, unfinished but not failed, and no start time is counted."""
        opened = self._open.pop(uid, None)
        if opened is not None:
            opened[0].add_event("paused")
            opened[0].end()

    def abandoned(self, uid: str, reason: str) -> None:
        opened = self._open.pop(uid, None)
        if opened is not None:
            opened[0].set_status(Status(StatusCode.ERROR, reason))
            opened[0].end()
