"""The controller's event sources live through transient failures (issue 15 H1): no file
descriptor left (EMFILE), a store that does not answer. Each failure is logged, counted in
tofu_qemu_controller_source_errors_total and retried with backoff; the controller never ends."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from api.infra.metrics import Metrics
from api.testing.waiting import wait_until_async
from controller.layout import DataLayout
from controller.sources import SOURCE_RETRY_CAP_SECONDS, SOURCE_RETRY_FIRST_SECONDS, keep_running
from tests.component.test_controller_failures import controller_on

EMFILE = OSError(errno.EMFILE, "Too many open files", "data/run")


def test_retry_delays_are_documented() -> None:
    """docs/controller.md: the first retry after 1 s, doubling up to 30 s."""
    assert (SOURCE_RETRY_FIRST_SECONDS, SOURCE_RETRY_CAP_SECONDS) == (1.0, 30.0)


async def test_a_failing_source_is_retried_with_backoff_counted_and_logged() -> None:
    failures = [EMFILE] * 6 + [sqlite3.OperationalError("unable to open database file")]
    runs = 0
    delays: list[float] = []
    counted: list[str] = []

    async def source() -> None:
        nonlocal runs
        runs += 1
        if failures:
            raise failures.pop(0)

    async def record_sleep(seconds: float) -> None:
        delays.append(seconds)

    with capture_logs() as logs:
        await keep_running("resync", source, failed=counted.append, sleep=record_sleep)
    assert runs == 8
    assert counted == ["resync"] * 7
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    failed = [entry for entry in logs if entry["event"] == "source_failed"]
    assert len(failed) == 7
    assert failed[0]["log_level"] == "warning"
    assert failed[0]["source"] == "resync"
    assert "Too many open files" in failed[0]["error"]


async def test_a_bug_in_a_source_is_not_retried() -> None:
    """Only transient errors are retried: a bug still ends the TaskGroup, loudly."""

    async def source() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await keep_running("watch-store", source, failed=lambda _name: None)


async def test_the_controller_survives_emfile_at_resync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reproduction of issue 15: listing DATA/run fails with EMFILE during a resync. The
    controller keeps running, counts the failure, and a later resync finishes."""
    real_runtime_uids = DataLayout.runtime_uids
    failures = 2

    def runtime_uids(layout: DataLayout) -> set[str]:
        nonlocal failures
        if failures:
            failures -= 1
            raise EMFILE
        return real_runtime_uids(layout)

    monkeypatch.setattr(DataLayout, "runtime_uids", runtime_uids)
    metrics = Metrics()
    with capture_logs() as logs:
        async with controller_on(tmp_path, metrics=metrics) as harness:
            check_resync = harness.controller.readiness_checks()["resync"]
            await wait_until_async(lambda: failures == 0)
            await wait_until_async(check_resync, lambda problem: problem is None)
            errors = metrics.registry.get_sample_value(
                "tofu_qemu_controller_source_errors_total", {"source": "resync"}
            )
            assert errors == 2
    assert [entry["source"] for entry in logs if entry["event"] == "source_failed"] == ["resync", "resync"]
