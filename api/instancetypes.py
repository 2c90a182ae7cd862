"""Instance types and preferences (docs/instancetypes.md): their API types, how they are found in
a state, the shipped common set, and how a VM's spec is resolved against them. Pure.

KubeVirt's semantics in tofu's shape: a `QemuInstanceType` sets `cpus` and `memory`, which a VM
that references it may not set; a `QemuPreference` sets defaults the VM may override. Both are
`terraform_data` manifests of a project; the `QemuCluster*` kinds come from the server's config.
A VM runs the revision of each that it first took (status.instanceType / status.preference)
until a rollout or a change of its own spec moves it to the current one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from api import snapshots
from api.json_body import drop_nulls, nesting_exceeds
from api.spec_fields import (
    CLUSTER_INSTANCE_TYPE_KIND,
    CLUSTER_PREFERENCE_KIND,
    INSTANCE_TYPE_KIND,
    PREFERENCE_KIND,
    CpuCount,
    MemoryMiB,
    Seconds,
    TypeName,
    check_type_name,
    describe_validation_error,
)
from api.types import Accel, CloudInitSpec, FrozenRevision, Labels, Machine, QemuVMSpec, RunStrategy

# The kinds a state may declare beside QemuVM; snapshots and restores (api/snapshots.py) travel
# the same way, from extraction to the store.
DECLARED_KINDS = (INSTANCE_TYPE_KIND, PREFERENCE_KIND, *snapshots.SNAPSHOT_KINDS)
CLUSTER_KIND_OF = {INSTANCE_TYPE_KIND: CLUSTER_INSTANCE_TYPE_KIND, PREFERENCE_KIND: CLUSTER_PREFERENCE_KIND}
# A type manifest is a handful of fields; cloud-init defaults make a preference the largest.
TYPE_MANIFEST_MAX_BYTES = 256 * 1024
TYPE_MANIFEST_DEPTH_MAX = 16
REVISION_DIGITS = 16
OUTDATED_CONDITION = "InstanceTypeOutdated"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class QemuInstanceTypeSpec(_Model):
    """What an instance type sets; a VM that references it may not set these itself."""

    cpus: CpuCount
    memory: MemoryMiB


class QemuPreferenceSpec(_Model):
    """Defaults for the VMs that reference the preference; each VM may override any of them."""

    machine: Machine | None = None
    accel: Accel | None = None
    run_strategy: RunStrategy | None = None
    stop_timeout: Seconds | None = None
    cloud_init: CloudInitSpec | None = None


class _Metadata(_Model):
    name: TypeName
    labels: Labels = {}


class QemuInstanceTypeManifest(_Model):
    api_version: Literal["tofu-qemu.dev/v1alpha1"]
    kind: Literal["QemuInstanceType"]
    metadata: _Metadata
    spec: QemuInstanceTypeSpec


class QemuPreferenceManifest(_Model):
    api_version: Literal["tofu-qemu.dev/v1alpha1"]
    kind: Literal["QemuPreference"]
    metadata: _Metadata
    spec: QemuPreferenceSpec


_MANIFESTS: dict[str, type[BaseModel]] = {
    INSTANCE_TYPE_KIND: QemuInstanceTypeManifest,
    PREFERENCE_KIND: QemuPreferenceManifest,
    **snapshots.MANIFESTS,
}
SPEC_MODELS: dict[str, type[QemuInstanceTypeSpec] | type[QemuPreferenceSpec]] = {
    INSTANCE_TYPE_KIND: QemuInstanceTypeSpec,
    CLUSTER_INSTANCE_TYPE_KIND: QemuInstanceTypeSpec,
    PREFERENCE_KIND: QemuPreferenceSpec,
    CLUSTER_PREFERENCE_KIND: QemuPreferenceSpec,
}

# KubeVirt's common-instancetypes "u1" sizes (small 1 vCPU 2 GiB, medium 1 vCPU 4 GiB, large
# 2 vCPUs 8 GiB) with a quarter of the memory: a TCG guest gains nothing from more, and three of
# each fit a laptop.
COMMON_INSTANCE_TYPES: dict[str, dict[str, Any]] = {
    "u1.small": {"cpus": 1, "memory": 512},
    "u1.medium": {"cpus": 1, "memory": 1024},
    "u1.large": {"cpus": 2, "memory": 2048},
}


def canonical_type_spec(kind: str, spec: object) -> dict[str, Any]:
    """A type's or a preference's spec validated and normalised ("1Gi" → 1024; unset fields
    left out, so a preference holds only the defaults it gives).

    :raise ValidationError: the spec is not valid for `kind`.
    """
    model = SPEC_MODELS[kind].model_validate(spec)
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


CLUSTER_TYPES_MAX = 256


def cluster_types(kind: str, tables: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The config file's `[instance_types.NAME]` or `[preferences.NAME]` tables, validated and
    normalised, by name.

    :raise ValueError: a bad name or spec, naming it (the settings error shows it).
    """
    if len(tables) > CLUSTER_TYPES_MAX:
        raise ValueError(f"at most {CLUSTER_TYPES_MAX} allowed, not {len(tables)}")
    result = {}
    for name, spec in sorted(tables.items()):
        problem = name_problem(name)
        if problem:
            raise ValueError(f"{kind} {name[:80]!r}: {problem}")
        try:
            result[name] = canonical_type_spec(kind, spec)
        except ValidationError as err:
            raise ValueError(f"{kind} {name!r}: {describe_validation_error(err)}") from None
    return result


def cluster_types_from_text(text: str) -> object:
    """A setting given as text (the environment): a JSON object of tables by name."""
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"must be a JSON object of tables by name: {err}") from None


def revision_of(spec: dict[str, Any]) -> str:
    encoded = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:REVISION_DIGITS]


# ---- Found in a state ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeclaredType:
    """One QemuInstanceType or QemuPreference found in a state."""

    kind: str
    name: str
    address: str
    labels: dict[str, str]
    spec: dict[str, Any]
    error: str | None

    @property
    def revision(self) -> str:
        """What a VM that takes this type records (revision_of its spec); an invalid one's
        differs from any valid spec's."""
        return revision_of(self.spec) if self.error is None else revision_of({"invalid": self.error})


def declared_kind(raw: dict[str, Any]) -> str | None:
    """The manifest's kind when it is one this module declares, else None (a QemuVM)."""
    kind = raw.get("kind")
    return kind if isinstance(kind, str) and kind in DECLARED_KINDS else None


def declare_type(address: str, raw: dict[str, Any]) -> DeclaredType | str:
    """The declared type, or a message saying why the manifest cannot be one at all (no name).

    Like a QemuVM, a type whose spec is wrong is kept with its error: the VMs that reference it
    then say so, and the state is never refused.
    """
    kind = str(raw.get("kind"))
    metadata = raw.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str):
        return f"metadata.name: a {kind} needs a name"
    problem = name_problem(name)
    if problem:
        return f"metadata.name: {problem}"
    try:
        size = len(msgspec.json.encode(raw))
    except RecursionError:
        size = TYPE_MANIFEST_MAX_BYTES + 1
    if size > TYPE_MANIFEST_MAX_BYTES or nesting_exceeds(raw, TYPE_MANIFEST_DEPTH_MAX):
        reason = f"manifest: larger than {TYPE_MANIFEST_MAX_BYTES} bytes or nested too deep"
        return DeclaredType(kind, name, address, {}, {}, reason)
    cleaned = drop_nulls(raw)
    try:
        manifest = _MANIFESTS[kind].model_validate(cleaned)
    except ValidationError as err:
        return DeclaredType(kind, name, address, {}, {}, describe_validation_error(err))
    dumped = manifest.model_dump(mode="json", by_alias=True, exclude_none=True)
    return DeclaredType(kind, name, address, dict(dumped["metadata"]["labels"]), dumped["spec"], None)


def mark_duplicates(found: list[DeclaredType]) -> tuple[DeclaredType, ...]:
    """One entry per kind and name; a name declared twice is an error on the first."""
    by_key: dict[tuple[str, str], list[DeclaredType]] = {}
    for item in found:
        by_key.setdefault((item.kind, item.name), []).append(item)
    result = []
    for (kind, name), items in by_key.items():
        first = items[0]
        if len(items) > 1:
            where = ", ".join(item.address for item in items)
            message = (
                f"metadata.name: {kind} {name!r} is declared {len(items)} times in this project: {where}"
            )
            first = DeclaredType(kind, name, first.address, first.labels, first.spec, message)
        result.append(first)
    return tuple(result)


def encode_declared(types: tuple[DeclaredType, ...]) -> list[dict[str, Any]]:
    return [
        {
            "kind": t.kind,
            "name": t.name,
            "address": t.address,
            "labels": t.labels,
            "spec": t.spec,
            "error": t.error,
        }
        for t in types
    ]


def decode_declared(items: list[dict[str, Any]]) -> tuple[DeclaredType, ...]:
    return tuple(
        DeclaredType(i["kind"], i["name"], i["address"], i["labels"], i["spec"], i["error"]) for i in items
    )


# ---- Resolving a VM's spec -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """A type's current content, as the catalog holds it: its spec, or why it is unusable."""

    spec: dict[str, Any]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Ref:
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class Resolution:
    """The VM's effective spec (or why it has none), and the revisions it now runs."""

    spec: QemuVMSpec | None
    error: str | None
    instance_type: FrozenRevision | None
    preference: FrozenRevision | None
    # Why a kept revision differs from the current one, one line per type; empty: up to date.
    outdated: tuple[str, ...] = ()


def refs_of(vm_spec: dict[str, Any]) -> tuple[Ref | None, Ref | None]:
    """The instance type and preference a stored spec references (any shape: an invalid spec is
    stored as written)."""
    refs: list[Ref | None] = []
    for field, default_kind in (("instanceType", INSTANCE_TYPE_KIND), ("preference", PREFERENCE_KIND)):
        value = vm_spec.get(field)
        name = value.get("name") if isinstance(value, dict) else None
        kind = value.get("kind", default_kind) if isinstance(value, dict) else None
        usable = isinstance(name, str) and isinstance(kind, str)
        refs.append(Ref(str(kind), str(name)) if usable else None)
    return refs[0], refs[1]


@dataclass(frozen=True, slots=True)
class Wanted:
    """What the resolution of one VM starts from."""

    project: str
    vm_spec: dict[str, Any]
    generation: int
    frozen_type: FrozenRevision | None
    frozen_preference: FrozenRevision | None
    rollout_requested_at: datetime | None


def resolve(wanted: Wanted, current: Mapping[Ref, Found | None], now: datetime) -> Resolution:
    """The effective spec of a VM: preference < the VM's own fields < instance type.

    A kept revision stays while the VM's generation is the one it was taken for and no rollout
    was asked since; otherwise the current content is taken. `current` holds the catalog's
    content for each referenced type (None: it does not exist).
    """
    type_ref, preference_ref = refs_of(wanted.vm_spec)
    problems: list[str] = []
    outdated: list[str] = []
    revisions: list[FrozenRevision | None] = []
    for ref, frozen, field in (
        (type_ref, wanted.frozen_type, "instanceType"),
        (preference_ref, wanted.frozen_preference, "preference"),
    ):
        revision, problem, stale = _revision(wanted, ref, frozen, current.get(ref) if ref else None, now)
        revisions.append(revision)
        if problem:
            problems.append(f"spec.{field}: {problem}")
        if stale:
            outdated.append(stale)
    type_revision, preference_revision = revisions
    if problems:
        return Resolution(None, "; ".join(problems), wanted.frozen_type, wanted.frozen_preference)
    spec, error = effective_spec(wanted.vm_spec, type_revision, preference_revision)
    if error is not None:
        return Resolution(None, error, wanted.frozen_type, wanted.frozen_preference)
    return Resolution(spec, None, type_revision, preference_revision, tuple(outdated))


def _revision(
    wanted: Wanted, ref: Ref | None, frozen: FrozenRevision | None, found: Found | None, now: datetime
) -> tuple[FrozenRevision | None, str | None, str | None]:
    """(the revision to run, a problem that makes the spec invalid, why it is outdated)."""
    if ref is None:
        return None, None, None
    keep = (
        frozen is not None
        and (frozen.kind, frozen.name) == (ref.kind, ref.name)
        and frozen.generation == wanted.generation
        and (wanted.rollout_requested_at is None or wanted.rollout_requested_at <= frozen.taken_at)
    )
    if keep and frozen is not None:
        if found is None:
            return frozen, None, f"{ref.kind} {ref.name!r} no longer exists; revision {frozen.revision} kept"
        if found.error is None and revision_of(found.spec) != frozen.revision:
            current = revision_of(found.spec)
            return (
                frozen,
                None,
                f"{ref.kind} {ref.name!r} changed: runs {frozen.revision}, current is {current}",
            )
        return frozen, None, None
    if found is None:
        scope = "cluster-wide" if ref.kind in CLUSTER_KIND_OF.values() else f"in project {wanted.project!r}"
        return None, f"{ref.kind} {ref.name!r} not found {scope}", None
    if found.error is not None:
        return None, f"{ref.kind} {ref.name!r} is invalid: {found.error}", None
    taken = FrozenRevision(
        kind=ref.kind,
        name=ref.name,
        revision=revision_of(found.spec),
        spec=found.spec,
        generation=wanted.generation,
        taken_at=now,
    )
    return taken, None, None


def effective_spec(
    vm_spec: dict[str, Any], instance_type: FrozenRevision | None, preference: FrozenRevision | None
) -> tuple[QemuVMSpec | None, str | None]:
    """Merge and validate; a field set by both the VM and its instance type is an error."""
    own = {key: value for key, value in vm_spec.items() if key not in ("instanceType", "preference")}
    merged: dict[str, Any] = dict(preference.spec) if preference else {}
    for key, value in own.items():
        if key == "cloudInit" and isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    if instance_type is not None:
        conflicts = sorted(key for key in instance_type.spec if key in own)
        if conflicts:
            return None, "; ".join(
                f"spec.{key}: set by {instance_type.kind} {instance_type.name!r}; "
                "a VM may not set what its instance type sets"
                for key in conflicts
            )
        merged.update(instance_type.spec)
    try:
        return QemuVMSpec.model_validate(merged), None
    except ValidationError as err:
        return None, describe_validation_error(err, prefix="spec")


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an instance type or preference, or None."""
    try:
        check_type_name(name)
    except ValueError as err:
        return str(err)
    return None
