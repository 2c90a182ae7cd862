"""Fencing and rescheduling decisions (pure; docs/multi-host.md, "Fencing").

- `fence_deadline`: when a controller that has not renewed its lease must kill its own QEMUs.
  It counts from the moment it *sent* its last successful renewal, on its own monotonic clock:
  the database stamped that renewal later, so the lease it granted ends later still. The
  controller fences a margin before: `FENCE_MARGIN_FRACTION` of the lease (3 s of the default
  15 s), time enough to SIGKILL its QEMUs and see them gone before any other host may start them.
- `rescheduled`: which VMs of lost hosts the scheduler moves: those that hold no data.
- `strays`: which QEMUs running here are no longer this host's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from api.hosts import PlacedVM

# The share of the lease kept between a controller's self-fence and the end of its lease.
FENCE_MARGIN_FRACTION = 0.2


def fence_margin(lease_seconds: float) -> float:
    """Seconds between a self-fence and the end of the lease it could not renew."""
    return lease_seconds * FENCE_MARGIN_FRACTION


def fence_deadline(renewal_sent_at: float, lease_seconds: float) -> float:
    """The monotonic time by which a controller whose last successful renewal was sent at
    `renewal_sent_at` must have killed its QEMUs, unless it renews meanwhile."""
    return renewal_sent_at + lease_seconds - fence_margin(lease_seconds)


def must_fence(now: float, renewal_sent_at: float, lease_seconds: float) -> bool:
    """Whether the lease may run out before another renewal: fence now."""
    return now >= fence_deadline(renewal_sent_at, lease_seconds)


def rescheduled(vms: Sequence[PlacedVM], lost: Mapping[str, str]) -> list[PlacedVM]:
    """The VMs on a lost host that the scheduler moves: those that hold no data (no disk, or
    only `reclaimPolicy: Delete` disks, made anew on the new host). The others wait for their
    host, or for `drain --force`."""
    return [vm for vm in vms if vm.host is not None and vm.host in lost and not vm.holds_data]


def strays(running: Iterable[str], mine: Iterable[str]) -> list[str]:
    """The uids whose QEMU runs here but which are no longer placed here (moved away while this
    controller was frozen or cut off): kill them, in order."""
    own = set(mine)
    return sorted(uid for uid in set(running) if uid not in own)
