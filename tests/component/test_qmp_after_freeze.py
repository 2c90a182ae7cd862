"""A controller frozen (SIGSTOP, its VM paused) or starved while a QMP command is on its way
does not take the QEMU that answered meanwhile for a hung one (controller/loop_stalls.py).

Before: when the loop ran again, the expired 2 s timer was served before the reply waiting in
the socket, query-status read UNREACHABLE, and the reconcile killed a healthy QEMU (a
controller woken after a 17 s freeze killed its own VMs). Real QEMU (`-machine none`), hence
the e2e mark, as the Hypervisor contract tests."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.model import QmpState
from controller.qemu.argv import RuntimePaths
from controller.qemu.monitor import COMMAND_TIMEOUT_SECONDS
from controller.qemu.runtime import Runtime
from tests.component.test_hypervisor_contract import UID, Subject

pytestmark = pytest.mark.e2e


@pytest.fixture
async def qemu(tmp_path: Path) -> AsyncIterator[Subject]:
    subject = Subject("qemu", RuntimePaths(tmp_path / "run" / UID))
    await subject.start()
    try:
        yield subject
    finally:
        await subject.close()


async def test_a_reply_that_came_while_the_controller_was_frozen_is_not_a_hung_qemu(qemu: Subject) -> None:
    pid = await qemu.spawn()
    runtime = qemu.hv
    assert isinstance(runtime, Runtime)
    runtime.distrust(UID)
    os.kill(pid, signal.SIGSTOP)  # holds the reply until the controller's loop is frozen
    try:
        asking = asyncio.create_task(runtime.qmp_state(UID))
        await asyncio.sleep(0.1)  # query-status is sent
    finally:
        os.kill(pid, signal.SIGCONT)
    # The controller freezes past the QMP timeout; QEMU answers meanwhile.
    time.sleep(COMMAND_TIMEOUT_SECONDS + 1.0)  # noqa: ASYNC251 - the loop frozen on purpose
    assert await asking is QmpState.PRELAUNCH
