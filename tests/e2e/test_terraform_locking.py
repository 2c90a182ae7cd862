"""Terraform 1.11's locking against a real server: conflicts, -lock-timeout and force-unlock."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import MakeTerraform
from tests.e2e.harness import HttpAnswer, ServerProcess, copy_example

pytestmark = pytest.mark.e2e

PROMPT_TIMEOUT = 30.0
# `-lock-timeout` retries LOCK after 1 s, 2 s, 4 s... (docs/backend.md#conflicts-and--lock-timeout):
# releasing at 2.5 s lets the attempt at ~3 s succeed instead of waiting for the one at ~7 s.
RELEASE_AFTER_SECONDS = 2.5


def test_plan_fails_while_an_apply_holds_the_lock_at_its_prompt(
    server: ServerProcess, project: str, make_terraform: MakeTerraform, tmp_path: Path
) -> None:
    """A plan from a second dir fails while an apply waits at its prompt, and names the apply's lock ID."""
    holder = make_terraform(copy_example("quickstart", tmp_path / "first"))
    other = make_terraform(copy_example("quickstart", tmp_path / "second"))
    holder.run("init")
    other.run("init")

    # The lock is held while the approval prompt waits (docs/backend.md#locks).
    with holder.interactive("apply") as apply:
        apply.wait_for_output("Enter a value:", timeout=PROMPT_TIMEOUT)
        lock = server.project(project)["lock"]
        assert lock is not None
        holder_id = lock["info"]["ID"]

        plan = other.run("plan", check=False)

        assert plan.returncode == 1, plan.describe()
        assert f"ID={holder_id}" in plan.output, plan.describe()
        apply.answer("no")
        assert apply.wait(timeout=PROMPT_TIMEOUT) == 1, apply.output
    assert "Apply cancelled" in apply.output
    assert server.project(project)["lock"] is None


def test_plan_fails_while_another_client_holds_the_lock(
    server: ServerProcess, project: str, make_terraform: MakeTerraform, tmp_path: Path
) -> None:
    """A plan fails while a lock taken over HTTP is held, and names that lock's ID."""
    tf = make_terraform(copy_example("quickstart", tmp_path))
    tf.run("init")
    lock_id = str(uuid.uuid4())
    assert server.lock(project, lock_id).status == 200

    plan = tf.run("plan", check=False)

    assert plan.returncode == 1, plan.describe()
    assert "Error acquiring the state lock" in plan.output, plan.describe()
    assert f"ID={lock_id}" in plan.output, plan.describe()
    assert server.project(project)["lock"]["info"]["ID"] == lock_id


def test_plan_waits_for_a_lock_released_within_lock_timeout(
    server: ServerProcess, project: str, make_terraform: MakeTerraform, tmp_path: Path
) -> None:
    """`plan -lock-timeout=10s` waits for a lock another client releases after ~3 s, then succeeds."""
    tf = make_terraform(copy_example("quickstart", tmp_path))
    tf.run("init")
    lock_id = str(uuid.uuid4())
    assert server.lock(project, lock_id).status == 200
    released: list[HttpAnswer] = []
    releaser = threading.Timer(
        RELEASE_AFTER_SECONDS, lambda: released.append(server.unlock(project, lock_id))
    )

    started = time.monotonic()
    releaser.start()
    try:
        plan = tf.run("plan", "-lock-timeout=10s")
    finally:
        releaser.cancel()
        releaser.join()
    waited = time.monotonic() - started

    assert [answer.status for answer in released] == [200]
    assert waited >= RELEASE_AFTER_SECONDS, plan.describe()
    assert "Plan: 1 to add" in plan.stdout
    assert server.project(project)["lock"] is None


def test_force_unlock_releases_a_leftover_lock(
    server: ServerProcess, project: str, make_terraform: MakeTerraform, tmp_path: Path
) -> None:
    """`terraform force-unlock -force ID` releases a lock left behind, after which plan works."""
    tf = make_terraform(copy_example("quickstart", tmp_path))
    tf.run("init")
    lock_id = str(uuid.uuid4())
    assert server.lock(project, lock_id).status == 200

    unlocked = tf.run("force-unlock", "-force", lock_id)

    assert "successfully unlocked" in unlocked.output, unlocked.describe()
    assert server.project(project)["lock"] is None
    tf.run("plan")
