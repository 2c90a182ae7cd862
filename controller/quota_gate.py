"""The store side of admission: reads the fleet's claims, and re-decides only when specs change."""

from __future__ import annotations

from datetime import datetime

from pydantic import ValidationError

from api.store import Database
from api.store.fleet import LiveSpec, live_specs, specs_version
from api.types import QemuVMSpec, RunStrategy
from controller.admission import ADMITTED, Admission, Claim, Quotas, admit


class QuotaGate:
    def __init__(self, db: Database, quotas: Quotas) -> None:
        self._db = db
        self._quotas = quotas
        self._version: tuple[int, int, int] | None = None
        self._verdicts: dict[str, Admission] = {}

    async def admission(self, uid: str) -> Admission:
        """`uid`'s verdict. With no limit configured this asks the store nothing."""
        if self._quotas.is_unlimited:
            return ADMITTED
        version = await specs_version(self._db)
        if version != self._version:
            claims = [claim for spec in await live_specs(self._db) if (claim := _claim(spec)) is not None]
            self._verdicts = admit(claims, self._quotas)
            self._version = version
        return self._verdicts.get(uid, ADMITTED)


def _claim(live: LiveSpec) -> Claim | None:
    """What a VM that wants to run claims; None for one that claims nothing (Halted)."""
    try:
        spec = QemuVMSpec.model_validate_json(live.spec)
    except ValidationError:
        return None  # the reconciler reports it; an unreadable spec runs nothing
    if spec.run_strategy is RunStrategy.HALTED:
        return None
    return Claim(
        uid=live.uid,
        project=live.project,
        created_at=datetime.fromisoformat(live.created_at),
        vcpus=spec.cpus,
        memory_mib=spec.memory,
        disk_mib=sum(disk.size or 0 for disk in spec.disks),
    )
