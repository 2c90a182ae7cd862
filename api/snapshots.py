"""VM snapshots and restores (docs/snapshots.md): their manifests and statuses. Pure.

A `QemuVMSnapshot` takes one snapshot of a VM of the same project, once; a `QemuVMRestore`
reverts a VM's disks to one, once. Both are `terraform_data` manifests and travel with the
instance types through extraction and publishing (api/instancetypes.py declares them); like a
QemuVM, a manifest whose spec is wrong is kept with its error, and the state is never refused.

The snapshot's data is a qcow2 internal snapshot in every disk of the VM, tagged with the
snapshot's name and revision (`snapshot_tag`): the tag is how the controller finds a
snapshot's data again after any crash, and deletes what no resource declares any more.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from api.spec_fields import DnsLabel, TypeName
from api.types import API_VERSION, Labels

SNAPSHOT_KIND = "QemuVMSnapshot"
RESTORE_KIND = "QemuVMRestore"
SNAPSHOT_KINDS = (SNAPSHOT_KIND, RESTORE_KIND)
# qcow2 snapshot tags written by tofu-qemu: "tofu:" NAME ":" REVISION. Tags of any other shape
# (an operator's own `qemu-img snapshot -c`) are never touched.
TAG_PREFIX = "tofu:"
_TAG_RE = re.compile(r"tofu:([a-z0-9][a-z0-9.-]{0,62}):([0-9a-f]{16})")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class VMRef(_Model):
    name: DnsLabel


class _Metadata(_Model):
    name: TypeName
    labels: Labels = {}


class QemuVMSnapshotSpec(_Model):
    source: VMRef


class QemuVMRestoreSpec(_Model):
    target: VMRef
    snapshot: TypeName = Field(description="The name of a QemuVMSnapshot of the same project")


class QemuVMSnapshotManifest(_Model):
    api_version: Literal["tofu-qemu.dev/v1alpha1"]
    kind: Literal["QemuVMSnapshot"]
    metadata: _Metadata
    spec: QemuVMSnapshotSpec


class QemuVMRestoreManifest(_Model):
    api_version: Literal["tofu-qemu.dev/v1alpha1"]
    kind: Literal["QemuVMRestore"]
    metadata: _Metadata
    spec: QemuVMRestoreSpec


MANIFESTS: dict[str, type[QemuVMSnapshotManifest] | type[QemuVMRestoreManifest]] = {
    SNAPSHOT_KIND: QemuVMSnapshotManifest,
    RESTORE_KIND: QemuVMRestoreManifest,
}


class Indication(StrEnum):
    """KubeVirt's snapshot indications: how consistent the snapshot is."""

    ONLINE = "Online"
    OFFLINE = "Offline"
    GUEST_AGENT = "GuestAgent"
    NO_GUEST_AGENT = "NoGuestAgent"


class QemuVMSnapshotStatus(_Model):
    """Written by the controller. `sourceSpec` is the VM's spec when the snapshot was taken."""

    ready_to_use: bool = False
    creation_time: datetime | None = None
    indications: tuple[Indication, ...] = ()
    error: str | None = None
    revision: str = Field(default="", description="The snapshot spec's revision this status is of")
    tag: str = Field(default="", description="The qcow2 internal snapshot's tag in each disk")
    disks: tuple[str, ...] = ()
    source_uid: str = ""
    source_spec: dict[str, Any] | None = None
    size_bytes: int = Field(default=0, description="Counted against max_disk_gib: its disks' virtual size")
    pause_ms: float | None = Field(default=None, description="How long the guest's I/O was held")


class QemuVMRestoreStatus(_Model):
    complete: bool = False
    restore_time: datetime | None = None
    error: str | None = None
    revision: str = ""
    # The VM was stopped for this restore and is to be started again when it is done.
    stopped_vm: bool = False


def snapshot_tag(name: str, revision: str) -> str:
    return f"{TAG_PREFIX}{name}:{revision}"


def parse_tag(tag: str) -> tuple[str, str] | None:
    """(name, revision) of a tag tofu-qemu wrote; None for any other tag."""
    found = _TAG_RE.fullmatch(tag)
    return (found.group(1), found.group(2)) if found else None


def to_object(
    kind: str,
    *,
    project: str,
    name: str,
    spec: dict[str, Any],
    error: str | None,
    status: dict[str, Any] | None,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """The Kubernetes-shaped object: the declared spec, the controller's status, and a Valid
    condition for the manifest itself."""
    metadata: dict[str, Any] = {"name": name, "namespace": project}
    if created_at is not None:
        metadata["creationTimestamp"] = created_at.isoformat().replace("+00:00", "Z")
    model = QemuVMSnapshotStatus if kind == SNAPSHOT_KIND else QemuVMRestoreStatus
    shown = model.model_validate(status or {}).model_dump(mode="json", by_alias=True)
    if error is not None:
        shown["error"] = error
    shown["conditions"] = [
        {
            "type": "Valid",
            "status": "False" if error else "True",
            "reason": "InvalidSpec" if error else "SpecAccepted",
            "message": error or "",
        }
    ]
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec, "status": shown}
