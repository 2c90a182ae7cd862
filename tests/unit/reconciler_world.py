"""A Reconciler on the fakes (MemoryStore, FakeHypervisor) and a ManualClock, for table tests.

`World.settle` runs reconciles the way the work queue would: again at once while a pass asks
for requeue(0), and stops at the first timed requeue (the test moves the clock itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from api.store.memory import MemoryStore
from api.store.records import DiskOwner, DiskRow, VMRecord
from api.types import Accel, QemuVMStatus, ReclaimPolicy, RunOverride, RunStrategy
from controller.actions import Action
from controller.admission import ADMITTED, Admission, Claim, Quota, Quotas, admit
from controller.clock import ManualClock
from controller.executor import Executor, GuestShutdowns
from controller.hypervisor_fake import FakeHypervisor
from controller.layout import DataLayout
from controller.observe import GuestReports
from controller.qemu.argv import RuntimePaths
from controller.reconciler import Outcome, Reconciler, Result
from controller.resources.disks import DiskManager
from controller.resources.ports import PortAllocator
from controller.telemetry import BootSpans

KERNEL = "tiny-guest/vmlinuz"
# Ports of this test's range (loopback probes only).
FIRST_PORT, LAST_PORT = 21500, 21599
LIVENESS = timedelta(seconds=10)


class TcgOnly:
    async def resolve(self, requested: Accel) -> Accel:
        return Accel.TCG


@dataclass
class StoreQuotas:
    """Admission as QuotaGate decides it, over the fake store's objects."""

    store: MemoryStore
    quotas: Quotas = field(default_factory=Quotas)

    async def admission(self, uid: str, generation: int) -> Admission:
        claims = []
        for each in await self.store.versions():
            record = await self.store.get(each)
            if record is None or record.deleted_at is not None:
                continue
            if record.spec.get("runStrategy") == RunStrategy.HALTED.value:
                continue
            memory = int(record.spec.get("memory", 512))
            claims.append(Claim(each, record.project, record.created_at, 1, memory, 0))
        return admit(claims, self.quotas).get(uid, ADMITTED)


def spec(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"memory": 256, "accel": "tcg", "boot": {"kernel": KERNEL}}
    return base | fields


WEB = spec(network={"forwards": [{"guestPort": 80}]})


class GuestAgentsLike(GuestShutdowns, GuestReports, Protocol):
    """The guest agents as the executor and observe use them (controller/guest_agents.py)."""


class RecordingExecutor(Executor):
    """The real executor, remembering the actions of the current pass."""

    performed: list[str]

    async def execute(self, uid: str, paths: RuntimePaths, action: Action) -> None:
        self.performed.append(type(action).__name__)
        await super().execute(uid, paths, action)


class World:
    def __init__(self, tmp_path: Path, *, agents: GuestAgentsLike | None = None) -> None:
        self.clock = ManualClock()
        self.store = MemoryStore()
        self.woken: list[str] = []
        self.hv = FakeHypervisor(clock=self.clock, wake=self.woken.append)
        images = tmp_path / "images"
        (images / "tiny-guest").mkdir(parents=True)
        (images / KERNEL).write_bytes(b"kernel")
        self.layout = DataLayout(tmp_path / "data", images)
        self.quotas = StoreQuotas(self.store)
        self.shutting_down = False
        self.restarts: list[str] = []
        boots = BootSpans(None)
        executor = self.executor = RecordingExecutor(
            hypervisor=self.hv,
            ports=PortAllocator(self.store, first=FIRST_PORT, last=LAST_PORT),
            disks=DiskManager(self.store, disks_dir=self.layout.disks_root),
            objects=self.store,
            clock=self.clock,
            boots=boots,
            agents=agents,
        )
        executor.performed = []
        self.reconciler = Reconciler(
            objects=self.store,
            allocations=self.store,
            hypervisor=self.hv,
            executor=executor,
            accel=TcgOnly(),
            layout=self.layout,
            clock=self.clock,
            boots=boots,
            quotas=self.quotas,
            liveness_period=LIVENESS,
            shutting_down=lambda: self.shutting_down,
            restarted=self.restarts.append,
            guests=agents,
        )
        self._created = 0

    def add(self, name: str, vm_spec: dict[str, Any] | None = None, *, error: str | None = None) -> str:
        uid = f"uid-{name}"
        self._created += 1
        created = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(minutes=self._created)
        self.store.put(
            VMRecord(uid, "lab", name, 1, vm_spec or WEB, error, {}, name, created, created, None, 1, None, 0)
        )
        return uid

    def change(self, uid: str, vm_spec: dict[str, Any], *, error: str | None = None) -> None:
        record = self.record(uid)
        self.store.put(replace(record, spec=vm_spec, spec_error=error, generation=record.generation + 1))

    def override(self, uid: str, *, stopped: bool = False, restart: bool = False) -> None:
        now = self.clock.now()
        request = RunOverride(
            stopped=stopped,
            restart_requested_at=now if restart else None,
            requested_by="alice",
            updated_at=now,
        )
        self.store.put(replace(self.record(uid), override=request.model_dump(mode="json", by_alias=True)))

    def delete(self, uid: str) -> None:
        self.store.delete(uid, self.clock.now())

    def record(self, uid: str) -> VMRecord:
        record = self.store._vms.get(uid)  # the fake's own state: tests look behind the Protocol
        assert record is not None, uid
        return record

    def status(self, uid: str) -> QemuVMStatus:
        return QemuVMStatus.model_validate(self.record(uid).status or {})

    def disk(self, uid: str, name: str, policy: ReclaimPolicy) -> Path:
        path = self.layout.disks_dir(uid) / f"{name}.qcow2"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"qcow2")
        row = DiskRow(uid, name, str(path), policy, 8, None, DiskOwner("lab", uid.removeprefix("uid-")))
        self.store._disks[(uid, name)] = row
        return path

    async def step(self, uid: str) -> Result:
        self.executor.performed = []
        return await self.reconciler.reconcile(uid)

    @property
    def last_actions(self) -> list[str]:
        """The actions the last pass performed (or tried)."""
        return list(self.executor.performed)

    def uid_gone(self, uid: str) -> bool:
        return uid not in self.store._vms

    async def settle(self, uid: str, *, passes: int = 12) -> Result:
        """Reconcile until a pass asks for anything but requeue(0) and nothing woke the VM
        meanwhile (an exit the hypervisor saw queues it again, as the work queue does)."""
        for _ in range(passes):
            self.woken.clear()
            result = await self.step(uid)
            again = result.outcome is Outcome.REQUEUE and result.requeue_after == timedelta(0)
            if not again and uid not in self.woken:
                return result
        raise AssertionError(f"{uid} did not settle in {passes} passes")

    async def advance(self, uid: str, seconds: float) -> Result:
        self.clock.advance(seconds)
        return await self.settle(uid)

    def events(self, uid: str) -> list[str]:
        return [event.reason for event in self.store.events if event.uid == uid]


def quotas(max_vms: int) -> Quotas:
    return Quotas(server=Quota(max_vms=max_vms))
