"""The store side of admission: reads the fleet's claims, and re-decides only when specs change.

What it costs, since every reconcile of a live VM asks (a default project quota always applies):
- a VM asking again at the generation it was decided at gets the kept verdict without a store
  read for FRESH_SECONDS, so other VMs' changes reach its verdict within that time (a new VM
  never changes an older one's verdict: admission is oldest first);
- otherwise one aggregate read (`admission_version`: specs, instance types, snapshots); when
  it moved, the live VMs' generations are read and only new or changed specs are fetched and
  parsed, then the fleet is decided again.
A VM's own new generation (an edit asking for more) is always decided fresh.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from pydantic import ValidationError

from api.instancetypes import CLUSTER_KIND_OF, Ref
from api.store import Database
from api.store.fleet import LiveSpecKey, admission_version, live_spec_keys, specs_of
from api.store.instancetypes import InstanceTypeSizes, Size
from api.types import QemuVMSpec, RunStrategy
from controller.admission import ADMITTED, INVALID_SPEC, Admission, Claim, Quotas, admit, host_port_problem
from controller.clock import Clock
from controller.network import NetworkPolicy, network_problem

FRESH_SECONDS = 1.0


class SnapshotHoldings(Protocol):
    """The disk space that snapshots hold, per project (api/store/snapshots.py)."""

    async def held_mib(self) -> dict[str, int]: ...


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What one generation of a live VM's spec asks for."""

    generation: int
    # None: it claims nothing (Halted, or its stored spec no longer validates).
    claim: Claim | None
    # Why it cannot run on this controller at all ("" when it can).
    problem: str = ""
    # The instance type that sizes it (its cpus and memory are the type's, read at each decision).
    sized_by: Ref | None = None


class QuotaGate:
    def __init__(
        self,
        db: Database,
        quotas: Quotas,
        *,
        port_range: tuple[int, int],
        clock: Clock,
        sizes: InstanceTypeSizes | None = None,
        network: NetworkPolicy | None = None,
        snapshots: SnapshotHoldings | None = None,
    ) -> None:
        """`sizes`: the instance types' current sizes (docs/instancetypes.md); without it a VM
        sized by a type claims nothing. `network`: what the host allows guests' networks
        (docs/networking.md; default: no egress). `snapshots`: the space snapshots hold, which
        counts against max_disk_gib before any VM (docs/snapshots.md)."""
        self._snapshots = snapshots
        self._network = network or NetworkPolicy()
        self._sizes = sizes
        self._db = db
        self._quotas = quotas
        self._port_range = port_range
        self._clock = clock
        self._version: tuple[object, ...] | None = None
        self._checked_at = float("-inf")
        self._parsed: dict[str, _Parsed] = {}
        self._verdicts: dict[str, Admission] = {}
        self._looking = asyncio.Lock()

    async def admission(self, uid: str, generation: int) -> Admission:
        """`uid`'s verdict at `generation`.

        One look at a time: the reconciles of a large apply all ask at once, and each would
        otherwise read the versions, every generation and the same new specs. Those that waited
        mostly find the look just taken fresh, and their specs parsed."""
        if self._fresh(uid, generation):
            return self._verdicts.get(uid, ADMITTED)
        async with self._looking:
            if self._fresh(uid, generation):
                return self._verdicts.get(uid, ADMITTED)
            return await self._look(uid, generation)

    def _fresh(self, uid: str, generation: int) -> bool:
        known = self._parsed.get(uid)
        current = known is not None and known.generation == generation
        return current and self._clock.monotonic() - self._checked_at < FRESH_SECONDS

    async def _look(self, uid: str, generation: int) -> Admission:
        now = self._clock.monotonic()
        known = self._parsed.get(uid)
        current = known is not None and known.generation == generation
        version = await admission_version(self._db)
        if version != self._version or not current:
            await self._decide_again()
            self._version = version
        self._checked_at = now
        return self._verdicts.get(uid, ADMITTED)

    async def _decide_again(self) -> None:
        keys = await live_spec_keys(self._db)
        changed = [key.uid for key in keys if self._known_generation(key.uid) != key.generation]
        specs = await specs_of(self._db, changed) if changed else {}
        parsed: dict[str, _Parsed] = {}
        for key in keys:
            kept = self._parsed.get(key.uid)
            if kept is not None and kept.generation == key.generation:
                parsed[key.uid] = kept
            elif key.uid in specs:
                parsed[key.uid] = self._parse(key, *specs[key.uid])
        self._parsed = parsed
        sized = [entry.sized_by for entry in parsed.values() if entry.sized_by is not None]
        sizes = await self._sizes.instance_type_sizes() if self._sizes is not None and sized else {}
        claims = (
            sized_claim(entry.claim, entry.sized_by, sizes) for entry in parsed.values() if not entry.problem
        )
        held = await self._snapshots.held_mib() if self._snapshots is not None else None
        self._verdicts = admit((claim for claim in claims if claim is not None), self._quotas, held)
        for uid, entry in parsed.items():
            if entry.problem:
                self._verdicts[uid] = Admission(False, entry.problem, INVALID_SPEC)

    def _known_generation(self, uid: str) -> int | None:
        kept = self._parsed.get(uid)
        return kept.generation if kept is not None else None

    def _parse(self, key: LiveSpecKey, generation: int, text: str) -> _Parsed:
        try:
            spec = QemuVMSpec.model_validate_json(text)
        except ValidationError:
            return _Parsed(generation, None)  # the reconciler reports it; an unreadable spec runs nothing
        problem = host_port_problem(spec, self._port_range) or network_problem(spec, self._network)
        if spec.run_strategy is RunStrategy.HALTED:
            return _Parsed(generation, None, problem)
        sized_by = None
        if spec.instance_type is not None:
            sized_by = Ref(spec.instance_type.kind, spec.instance_type.name)
        claim = Claim(
            uid=key.uid,
            project=key.project,
            created_at=datetime.fromisoformat(key.created_at),
            vcpus=spec.cpus,
            memory_mib=spec.memory,
            disk_mib=sum(disk.size or 0 for disk in spec.disks),
            ports=len(spec.network.forwards),
        )
        return _Parsed(generation, claim, problem, sized_by)


def sized_claim(
    claim: Claim | None, sized_by: Ref | None, sizes: Mapping[tuple[str | None, Ref], Size]
) -> Claim | None:
    """`claim` with the cpus and memory of the instance type that sizes it; None when that type
    is unknown or invalid (the VM is then Valid=False and runs nothing)."""
    if claim is None or sized_by is None:
        return claim
    scope = None if sized_by.kind in CLUSTER_KIND_OF.values() else claim.project
    size = sizes.get((scope, sized_by))
    if size is None:
        return None
    return replace(claim, vcpus=size.cpus, memory_mib=size.memory_mib)
