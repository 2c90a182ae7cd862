"""The CustomResourceDefinitions of QemuVMSnapshot and QemuVMRestore (docs/snapshots.md), made
from the same models as their validation and their status by the converter of the instance
types' (api/instancetypes_crd.py). Pure. `hack/gen-crds` writes them beside crds/qemuvm.yaml.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from api import crd
from api.instancetypes_crd import type_crd
from api.snapshots import (
    RESTORE_KIND,
    SNAPSHOT_KIND,
    QemuVMRestoreSpec,
    QemuVMRestoreStatus,
    QemuVMSnapshotSpec,
    QemuVMSnapshotStatus,
)

Schema = dict[str, Any]
_CONDITIONS: Schema = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {name: {"type": "string"} for name in ("type", "status", "reason", "message")},
        "required": ["type", "status", "reason"],
    },
}
# (kind, plural, short name, spec model, status model, what it is)
_KINDS: tuple[tuple[str, str, str, type[BaseModel], type[BaseModel], str], ...] = (
    (SNAPSHOT_KIND, "qemuvmsnapshots", "vmsnap", QemuVMSnapshotSpec, QemuVMSnapshotStatus,
     "One snapshot of every disk of a QemuVM of the same project, taken once; declared in state."),
    (RESTORE_KIND, "qemuvmrestores", "vmrestore", QemuVMRestoreSpec, QemuVMRestoreStatus,
     "Reverts a QemuVM's disks to one of its QemuVMSnapshots, once; declared in state."),
)  # fmt: skip


def _status(model: type[BaseModel]) -> Schema:
    status = crd.structural(crd.model_schema(model, "serialization"), path="status", keep_defaults=False)
    status["properties"]["conditions"] = _CONDITIONS
    if "sourceSpec" in status["properties"]:
        # The VM's spec when the snapshot was taken: the QemuVM's own schema.
        [version] = crd.generate()["spec"]["versions"]
        status["properties"]["sourceSpec"] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return status


def generate() -> dict[str, Schema]:
    """Each CRD by the file name it is written to under crds/."""
    return {
        f"{plural}.yaml": type_crd(kind, plural, short, True, spec, about, status=_status(status))
        for kind, plural, short, spec, status, about in _KINDS
    }
