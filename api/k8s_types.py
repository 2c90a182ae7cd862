"""The shapes the Kubernetes-style API (/apis/tofu-qemu.dev/v1alpha1) serves besides QemuVM:
lists, watch events, events, locks and the error `Status`. Pure.

The handlers build their answers from these models, and api/openapi.py documents them from the
same models, so the document cannot drift from what is served.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from api.types import QemuVM

WatchEventType = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]
# Kubernetes' annotation on the bookmark that ends a watch's initial events.
INITIAL_EVENTS_END = "k8s.io/initial-events-end"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class ListMeta(_Model):
    resource_version: str = Field(description="The store's resourceVersion when the list was read")


class QemuVMList(_Model):
    api_version: Literal["tofu-qemu.dev/v1alpha1"] = "tofu-qemu.dev/v1alpha1"
    kind: Literal["QemuVMList"] = "QemuVMList"
    metadata: ListMeta
    items: tuple[QemuVM, ...]


class Status(_Model):
    """Every error body (api/server/errors.py), as Kubernetes' metav1.Status."""

    # /readyz adds `failed` and `checks` to its 503.
    model_config = ConfigDict(extra="allow")

    kind: Literal["Status"] = "Status"
    api_version: Literal["v1"] = "v1"
    status: Literal["Failure", "Success"] = "Failure"
    code: int
    reason: str = Field(description="CamelCase: NotFound, BadRequest, Expired, TooManyRequests, ...")
    message: str


class BookmarkMeta(_Model):
    resource_version: str
    annotations: dict[str, str] = Field(default_factory=dict)


class Bookmark(_Model):
    """The object of a BOOKMARK event: only the resourceVersion the watch has reached."""

    api_version: Literal["tofu-qemu.dev/v1alpha1"] = "tofu-qemu.dev/v1alpha1"
    kind: Literal["QemuVM"] = "QemuVM"
    metadata: BookmarkMeta


class WatchEvent(_Model):
    """One line of a watch stream."""

    type: WatchEventType
    object: QemuVM | Bookmark | Status


class Event(_Model):
    id: int = Field(description="Increasing; pass the last one as ?afterId= to poll for newer events")
    time: datetime
    type: Literal["Normal", "Warning"]
    reason: str
    message: str
    trace_id: str | None = None
    trace_url: str | None = Field(
        default=None, description="The trace's page, from the server's trace_url_template; null when unset"
    )
    uid: str = Field(description="The VM's uid; empty for a project-level event")
    project: str
    vm_name: str = Field(description="Empty for a project-level event")


class EventList(_Model):
    api_version: Literal["tofu-qemu.dev/v1alpha1"] = "tofu-qemu.dev/v1alpha1"
    kind: Literal["EventList"] = "EventList"
    items: tuple[Event, ...]


class Lock(_Model):
    """A held Terraform state lock, from the lock info the client sent (docs/backend.md#locks)."""

    project: str
    id: str = Field(description="The lock info's ID")
    who: str = Field(description="The lock info's Who (user@host)")
    operation: str = Field(description="The lock info's Operation (OperationTypeApply, ...)")
    created: str = Field(description="The lock info's Created, as the client wrote it (RFC 3339)")
    locked_at: datetime = Field(description="When the server granted the lock")
    age_seconds: float = Field(description="Seconds since lockedAt")
    info: dict[str, Any] = Field(description="The lock info verbatim")


class LockList(_Model):
    api_version: Literal["tofu-qemu.dev/v1alpha1"] = "tofu-qemu.dev/v1alpha1"
    kind: Literal["LockList"] = "LockList"
    items: tuple[Lock, ...]


class PurgeStatesRequest(_Model):
    """Optional body of purge-states."""

    keep: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Old versions to keep besides the current and the published one (the newest)",
    )


class PurgeStatesResult(_Model):
    project: str
    removed: int = Field(description="Versions removed")
    kept: int = Field(description="Versions left: the current, the published one and the kept newest")


class ForceUnlockRequest(_Model):
    """Optional body of force-unlock: the lock ID you mean to release, so that a newer lock
    taken by someone else meanwhile is not released by mistake."""

    id: str | None = Field(default=None, min_length=1, max_length=1024)
