"""Guests yield the CPU to the control plane: nice value and autogroup of a real child process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.qemu.priority import lower_priority

# A child with a second thread, in its own session like QEMU: the threads and autogroup both count.
THREADED_CHILD = (
    "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"
)


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", THREADED_CHILD], start_new_session=True)
    try:
        while len(os.listdir(f"/proc/{process.pid}/task")) < 2:
            assert process.poll() is None
            time.sleep(0.005)
        yield process
    finally:
        process.kill()
        process.wait()


def test_every_thread_and_the_autogroup_get_the_nice_value(child: subprocess.Popen[bytes]) -> None:
    lower_priority(child.pid, 10)

    tids = [int(tid) for tid in os.listdir(f"/proc/{child.pid}/task")]
    assert len(tids) >= 2
    # Only ever raised: a test run under `nice -n 15` leaves its children at 15.
    expected = max(10, os.getpriority(os.PRIO_PROCESS, 0))
    assert {os.getpriority(os.PRIO_PROCESS, tid) for tid in tids} == {expected}
    autogroup = Path(f"/proc/{child.pid}/autogroup")
    if autogroup.exists():  # kernels built without CONFIG_SCHED_AUTOGROUP have no such file
        assert autogroup.read_text().split()[-1] == "10"


def test_zero_leaves_the_process_alone(child: subprocess.Popen[bytes]) -> None:
    lower_priority(child.pid, 0)
    assert os.getpriority(os.PRIO_PROCESS, child.pid) == os.getpriority(os.PRIO_PROCESS, os.getpid())


def test_a_process_that_is_gone_is_not_an_error() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    lower_priority(process.pid, 10)
