"""The store side of admission: reads the fleet's claims, and re-decides only when specs change.

What it costs, since every reconcile of a live VM asks (a default project quota always applies):
- a VM asking again at the generation it was decided at gets the kept verdict without a store
  read for FRESH_SECONDS, so other VMs' changes reach its verdict within that time (a new VM
  never changes an older one's verdict: admission is oldest first);
- otherwise one aggregate read (`specs_version`); when it moved, the live VMs' generations are
  read and only new or changed specs are fetched and parsed, then the fleet is decided again.
A VM's own new generation (an edit asking for more) is always decided fresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from api.store import Database
from api.store.fleet import LiveSpecKey, live_spec_keys, specs_of, specs_version
from api.types import QemuVMSpec, RunStrategy
from controller.admission import ADMITTED, INVALID_SPEC, Admission, Claim, Quotas, admit, host_port_problem
from controller.clock import Clock

FRESH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What one generation of a live VM's spec asks for."""

    generation: int
    # None: it claims nothing (Halted, or its stored spec no longer validates).
    claim: Claim | None
    # Why it cannot run on this controller at all ("" when it can).
    problem: str = ""


class QuotaGate:
    def __init__(self, db: Database, quotas: Quotas, *, port_range: tuple[int, int], clock: Clock) -> None:
        self._db = db
        self._quotas = quotas
        self._port_range = port_range
        self._clock = clock
        self._version: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self._parsed: dict[str, _Parsed] = {}
        self._verdicts: dict[str, Admission] = {}

    async def admission(self, uid: str, generation: int) -> Admission:
        """`uid`'s verdict at `generation`."""
        now = self._clock.monotonic()
        known = self._parsed.get(uid)
        current = known is not None and known.generation == generation
        if current and now - self._checked_at < FRESH_SECONDS:
            return self._verdicts.get(uid, ADMITTED)
        version = await specs_version(self._db)
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
        self._verdicts = admit(
            (entry.claim for entry in parsed.values() if entry.claim is not None and not entry.problem),
            self._quotas,
        )
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
        problem = host_port_problem(spec, self._port_range)
        if spec.run_strategy is RunStrategy.HALTED:
            return _Parsed(generation, None, problem)
        claim = Claim(
            uid=key.uid,
            project=key.project,
            created_at=datetime.fromisoformat(key.created_at),
            vcpus=spec.cpus,
            memory_mib=spec.memory,
            disk_mib=sum(disk.size or 0 for disk in spec.disks),
            ports=len(spec.network.forwards),
        )
        return _Parsed(generation, claim, problem)
