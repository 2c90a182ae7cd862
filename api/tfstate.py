"""Terraform/OpenTofu state documents (format version 4): parsing and QemuVM extraction.

Pure: bytes in, frozen values out. The server stores the state verbatim whatever this module
finds inside it; extraction problems become VM conditions or project notes, never a refused
write (PROTOCOL.md §7 describes the format; §8 the OpenTofu encryption envelope).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api import names
from api.types import API_GROUP, KIND, QemuVMManifest, describe_validation_error

SUPPORTED_STATE_VERSION = 4
TERRAFORM_DATA = "terraform_data"
# A future provider's resource type; its attributes carry the manifest fields directly.
QEMU_VM_RESOURCE = "qemu_vm"
DECLARE_CACHE_SIZE = 16384


class StateFormatError(ValueError):
    """The body is not a state document a Terraform or OpenTofu client could have written."""


@dataclass(frozen=True, slots=True)
class StateSummary:
    """What the server needs to know about a state without understanding its resources."""

    serial: int | None
    lineage: str | None
    encryption_version: str | None
    document: dict[str, Any]

    @property
    def is_encrypted(self) -> bool:
        return self.encryption_version is not None


@dataclass(frozen=True, slots=True)
class DeclaredVM:
    """One QemuVM found in a state: its canonical spec, or its raw input and what is wrong."""

    name: str
    address: str
    labels: dict[str, str]
    spec: dict[str, Any]
    error: str | None
    spec_hash: str


@dataclass(frozen=True, slots=True)
class ExtractionProblem:
    """A manifest that cannot become a VM object at all (no usable name)."""

    address: str
    message: str


@dataclass(frozen=True, slots=True)
class Extraction:
    vms: tuple[DeclaredVM, ...]
    problems: tuple[ExtractionProblem, ...]


def parse_state(body: bytes) -> StateSummary:
    """Parse a state body far enough to store it: plain v4 state or an encrypted envelope.

    :raise StateFormatError: for anything else, with a message fit for the HTTP client.
    """
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateFormatError(f"state is not valid JSON: {err}") from err
    if not isinstance(document, dict):
        raise StateFormatError("state must be a JSON object")
    serial = document.get("serial")
    lineage = document.get("lineage")
    if serial is not None and (isinstance(serial, bool) or not isinstance(serial, int) or serial < 0):
        raise StateFormatError("state 'serial' must be a non-negative integer")
    if lineage is not None and not isinstance(lineage, str):
        raise StateFormatError("state 'lineage' must be a string")
    encryption_version = document.get("encryption_version")
    if encryption_version:
        # OpenTofu's own test for an encrypted envelope is a non-empty encryption_version.
        return StateSummary(serial, lineage, str(encryption_version), document)
    version = document.get("version")
    if version != SUPPORTED_STATE_VERSION:
        raise StateFormatError(
            f"state format version {version!r} is not supported; expected {SUPPORTED_STATE_VERSION}"
        )
    if serial is None or lineage is None:
        raise StateFormatError("state needs 'serial' and 'lineage'")
    resources = document.get("resources", [])
    if not isinstance(resources, list):
        raise StateFormatError("state 'resources' must be a list")
    return StateSummary(serial, lineage, None, document)


def extract_vms(document: dict[str, Any]) -> Extraction:
    """Find every QemuVM declared in a plain state and validate it.

    Deposed objects (create_before_destroy leftovers) are skipped: they are on their way out.
    Tainted objects are kept: they still exist until the next apply replaces them.
    """
    found: list[DeclaredVM] = []
    problems: list[ExtractionProblem] = []
    for address, raw in _manifest_candidates(document):
        vm_or_problem = _declare_cached(address, json.dumps(raw, separators=(",", ":")))
        if isinstance(vm_or_problem, ExtractionProblem):
            problems.append(vm_or_problem)
        else:
            found.append(vm_or_problem)
    return Extraction(vms=_mark_duplicate_names(found), problems=tuple(problems))


def canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _manifest_candidates(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    candidates = []
    for resource in document.get("resources") or []:
        if not isinstance(resource, dict) or resource.get("mode") != "managed":
            continue
        resource_type = resource.get("type")
        if resource_type not in (TERRAFORM_DATA, QEMU_VM_RESOURCE):
            continue
        for instance in resource.get("instances") or []:
            if not isinstance(instance, dict) or instance.get("deposed"):
                continue
            attributes = instance.get("attributes")
            if not isinstance(attributes, dict):
                continue
            raw = _manifest_of(resource_type, attributes)
            if raw is not None:
                candidates.append((_instance_address(resource, instance), raw))
    return candidates


def _manifest_of(resource_type: str, attributes: dict[str, Any]) -> dict[str, Any] | None:
    if resource_type == QEMU_VM_RESOURCE:
        fields = {
            key: _unwrap_dynamic(attributes.get(key)) for key in ("apiVersion", "kind", "metadata", "spec")
        }
        return {
            "apiVersion": fields["apiVersion"] or f"{API_GROUP}/v1alpha1",
            "kind": fields["kind"] or KIND,
            "metadata": fields["metadata"],
            "spec": fields["spec"],
        }
    value = _unwrap_dynamic(attributes.get("input"))
    if not isinstance(value, dict):
        return None
    api_version = value.get("apiVersion")
    is_ours = value.get("kind") == KIND or (
        isinstance(api_version, str) and api_version.startswith(f"{API_GROUP}/")
    )
    return value if is_ours else None


def _unwrap_dynamic(value: object) -> object:
    """A dynamic attribute is stored as {"value": v, "type": t}; unwrap it (PROTOCOL.md §7.3)."""
    if isinstance(value, dict) and set(value) == {"value", "type"}:
        return value["value"]
    return value


def _drop_nulls(value: object) -> object:
    """HCL optional attributes arrive as null; null means "use the default" in a manifest."""
    if isinstance(value, dict):
        return {key: _drop_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_nulls(item) for item in value]
    return value


@functools.lru_cache(maxsize=DECLARE_CACHE_SIZE)
def _declare_cached(address: str, raw_json: str) -> DeclaredVM | ExtractionProblem:
    """`_declare`, remembered by the manifest's exact text: a state is written again and again
    with the same VMs (every apply, every serial bump), and validation is most of the cost."""
    return _declare(address, json.loads(raw_json))


def _declare(address: str, raw: dict[str, Any]) -> DeclaredVM | ExtractionProblem:
    cleaned = _drop_nulls(raw)
    assert isinstance(cleaned, dict)
    metadata = cleaned.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str):
        return ExtractionProblem(address, "metadata.name: a QemuVM needs a name")
    name_problem = names.dns_label_problem(name)
    if name_problem:
        return ExtractionProblem(address, f"metadata.name: {name[:80]!r} {name_problem}")
    try:
        manifest = QemuVMManifest.model_validate(cleaned)
    except ValidationError as err:
        raw_spec = cleaned.get("spec")
        spec = raw_spec if isinstance(raw_spec, dict) else {"invalid": raw_spec}
        raw_labels = metadata.get("labels") if isinstance(metadata, dict) else None
        labels = _string_dict(raw_labels)
        return DeclaredVM(
            name=name,
            address=address,
            labels=labels,
            spec=spec,
            error=describe_validation_error(err),
            spec_hash=_digest({"invalid": cleaned}),
        )
    spec = manifest.spec.model_dump(mode="json", by_alias=True)
    labels = dict(manifest.metadata.labels)
    return DeclaredVM(
        name=name,
        address=address,
        labels=labels,
        spec=spec,
        error=None,
        spec_hash=_digest({"spec": spec, "labels": labels}),
    )


def _mark_duplicate_names(found: list[DeclaredVM]) -> tuple[DeclaredVM, ...]:
    by_name: dict[str, list[DeclaredVM]] = defaultdict(list)
    for vm in found:
        by_name[vm.name].append(vm)
    result = []
    for name, declared in by_name.items():
        if len(declared) == 1:
            result.append(declared[0])
            continue
        addresses = ", ".join(vm.address for vm in declared)
        first = declared[0]
        message = f"metadata.name: {name!r} is declared {len(declared)} times in this project: {addresses}"
        result.append(
            DeclaredVM(
                name=name,
                address=first.address,
                labels=first.labels,
                spec=first.spec,
                error=message,
                spec_hash=_digest({"conflict": [vm.spec_hash for vm in declared]}),
            )
        )
    return tuple(result)


def _string_dict(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(key): str(item) for key, item in value.items()}


def _digest(value: object) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def _instance_address(resource: dict[str, Any], instance: dict[str, Any]) -> str:
    """Build `module.m["k"].terraform_data.vm[0]` the way Terraform prints addresses."""
    module = resource.get("module")
    address = f"{module}." if isinstance(module, str) and module else ""
    address += f"{resource.get('type')}.{resource.get('name')}"
    if "index_key" in instance:
        key = instance["index_key"]
        address += f"[{json.dumps(key)}]" if isinstance(key, str) else f"[{key}]"
    return address
