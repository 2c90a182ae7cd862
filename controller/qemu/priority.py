"""CPU priority of QEMU processes: guests yield to the control plane.

Booting guests on TCG keep every core busy. At equal priority the API and the controller get
a sliver of a core (measured: 0.04 cores with 50 guests booting on 2), so Terraform's requests
and every reconcile crawl exactly when an apply needs them. A positive nice value for guests
costs them nothing while the control plane is idle, which is nearly always.

Two knobs, because which one the kernel honours depends on the host:
- with autogroup scheduling (desktop and most VM kernels), each session is one scheduling
  group and QEMU runs in its own session (so it outlives the controller): only the
  autogroup's nice (/proc/PID/autogroup) changes its weight against the controller's group;
- without it (e.g. in a container's cgroup), the per-thread nice value does.
Raising nice needs no privilege; lowering it again does, so failures to lower are ignored.
"""

from __future__ import annotations

import contextlib
import os


def lower_priority(pid: int, nice: int) -> None:
    """Give every current thread of `pid`, and its session's autogroup, nice value `nice`.

    Threads started later inherit the value from the thread that starts them. Best effort:
    a process that is gone or a kernel without autogroup is not an error.
    """
    if nice <= 0:
        return
    with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as autogroup:
        autogroup.write(str(nice))
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in threads:
        with contextlib.suppress(OSError):
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
