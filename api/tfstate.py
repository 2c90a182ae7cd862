"""Terraform/OpenTofu state documents (format version 4): parsing and QemuVM extraction.

Pure: bytes in, frozen values out. The server stores the state verbatim whatever this module
finds inside it; extraction problems become VM conditions or project notes, never a refused
write (docs/backend.md#the-state-document describes the format; #opentofu-state-encryption the envelope).

The only bodies refused are those no Terraform or OpenTofu client writes and the store could
not hold or serve back: not UTF-8 JSON, nested past the parser's recursion limit, integers past
its digit limit, lone UTF-16 surrogates, serials past SQLite's 64-bit integers. Work done per
manifest is bounded by its depth and size, so a hostile state costs time in proportion to its
bytes and never a crash (docs/security.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
from pydantic import ValidationError

from api import instancetypes, names
from api.json_body import StateFormatError as StateFormatError
from api.json_body import decode_json, drop_nulls
from api.json_body import holds_lone_surrogate as holds_lone_surrogate
from api.json_body import load_json as load_json
from api.json_body import nesting_exceeds as nesting_exceeds
from api.spec_fields import describe_validation_error
from api.types import API_GROUP, KIND, QemuVMManifest, canonical_spec

SUPPORTED_STATE_VERSION = 4
TERRAFORM_DATA = "terraform_data"
# A future provider's resource type; its attributes carry the manifest fields directly.
QEMU_VM_RESOURCE = "qemu_vm"
DECLARE_CACHE_SIZE = 16384
# SQLite's INTEGER. Terraform's serial is a uint64 that grows by one per write.
SERIAL_MAX = 2**63 - 1
# A valid manifest nests 5 containers deep (spec.network.forwards[0] holds hostPort); deeper
# ones are refused before anything recurses into them (drop_nulls, pydantic).
MANIFEST_DEPTH_MAX = 16
# A valid manifest with every list full and every string at its limit is under 40 KiB.
MANIFEST_MAX_BYTES = 64 * 1024
# Only manifests this small are remembered by _declare_cached: the cache holds its keys, so
# this bounds its memory (typical manifests are a few hundred bytes).
CACHED_MANIFEST_MAX_BYTES = 4 * 1024


@dataclass(frozen=True, slots=True)
class StateSummary:
    """What the server needs to know about a state without understanding its resources."""

    serial: int | None
    lineage: str | None
    encryption_version: str | None
    document: dict[str, Any]
    # Decoded by the strict parser, so every number in it is finite and each value has one
    # encoding: its manifests can be remembered by their encoded bytes (extract_vms `cache`).
    strict: bool = True

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
    # QemuInstanceType and QemuPreference manifests (api/instancetypes.py).
    types: tuple[instancetypes.DeclaredType, ...] = ()


def parse_state(body: bytes) -> StateSummary:
    """Parse a state body far enough to store it: plain v4 state or an encrypted envelope.

    :raise StateFormatError: for anything else, with a message fit for the HTTP client.
    """
    document, strict = decode_json(body, what="state")
    if not isinstance(document, dict):
        raise StateFormatError("state must be a JSON object")
    return summarize(document, strict=strict)


def summarize(document: dict[str, Any], *, strict: bool) -> StateSummary:
    """The summary of a decoded state object. :raise StateFormatError: as parse_state."""
    serial = document.get("serial")
    lineage = document.get("lineage")
    if serial is not None and (isinstance(serial, bool) or not isinstance(serial, int) or serial < 0):
        raise StateFormatError("state 'serial' must be a non-negative integer")
    if serial is not None and serial > SERIAL_MAX:
        raise StateFormatError(f"state 'serial' must be at most {SERIAL_MAX}")
    if lineage is not None and not isinstance(lineage, str):
        raise StateFormatError("state 'lineage' must be a string")
    encryption_version = document.get("encryption_version")
    if encryption_version is not None and not isinstance(encryption_version, str):
        # A string in both clients' Go structs; anything else is not an envelope they wrote.
        raise StateFormatError("state 'encryption_version' must be a string")
    if encryption_version:
        # OpenTofu's own test for an encrypted envelope is a non-empty encryption_version.
        return StateSummary(serial, lineage, encryption_version, document, strict)
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
    return StateSummary(serial, lineage, None, document, strict)


def extract_vms(document: dict[str, Any], *, cache: bool = True) -> Extraction:
    """Find every QemuVM declared in a plain state (as parse_state returned it) and validate it.

    Deposed objects (create_before_destroy leftovers) are skipped: they are on their way out.
    Tainted objects are kept: they still exist until the next apply replaces them.

    With `cache`, a manifest met before (same address, same encoded bytes) is not validated
    again: an apply rewrites the whole state, usually with most VMs unchanged. Pass
    `cache=False` for a document the strict parser did not read (StateSummary.strict): NaN
    and null encode alike there.
    """
    return extraction_of(
        declare_bounded(address, raw, cache=cache) for address, raw in _manifest_candidates(document)
    )


Declared = DeclaredVM | instancetypes.DeclaredType | ExtractionProblem


def extraction_of(declared: Iterable[Declared]) -> Extraction:
    """What a state declares, sorted by kind, with duplicate names marked."""
    vms: list[DeclaredVM] = []
    types: list[instancetypes.DeclaredType] = []
    problems: list[ExtractionProblem] = []
    for item in declared:
        if isinstance(item, DeclaredVM):
            vms.append(item)
        elif isinstance(item, ExtractionProblem):
            problems.append(item)
        else:
            types.append(item)
    return Extraction(
        vms=mark_duplicate_names(vms), problems=tuple(problems), types=instancetypes.mark_duplicates(types)
    )


def canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _manifest_candidates(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    candidates = []
    for resource in _list_at(document, "resources"):
        if not declares_vms(resource):
            continue
        for instance in _list_at(resource, "instances"):
            candidate = manifest_candidate(resource, instance)
            if candidate is not None:
                candidates.append(candidate)
    return candidates


def _list_at(parent: dict[str, Any], key: str) -> list[Any]:
    """`parent[key]` when it is a list; a state of another shape (`"instances": true`) holds no
    manifests there, and must not fail the write that carries it."""
    value = parent.get(key)
    return value if isinstance(value, list) else []


def declares_vms(resource: object) -> bool:
    """Whether a state's resource is of a type whose instances may hold QemuVM manifests."""
    return (
        isinstance(resource, dict)
        and resource.get("mode") == "managed"
        and resource.get("type") in (TERRAFORM_DATA, QEMU_VM_RESOURCE)
    )


def manifest_candidate(resource: dict[str, Any], instance: object) -> tuple[str, dict[str, Any]] | None:
    """The address and raw manifest of one instance of a `declares_vms` resource, if it has one."""
    if not isinstance(instance, dict) or instance.get("deposed"):
        return None
    attributes = instance.get("attributes")
    if not isinstance(attributes, dict):
        return None
    raw = _manifest_of(resource["type"], attributes)
    return None if raw is None else (_instance_address(resource, instance), raw)


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
    """A dynamic attribute is stored as {"value": v, "type": t}; unwrap it
    (docs/backend.md#the-state-document)."""
    if isinstance(value, dict) and set(value) == {"value", "type"}:
        return value["value"]
    return value


def declare_bounded(address: str, raw: dict[str, Any], *, cache: bool) -> Declared:
    """`_declare`, with the manifest's depth and size checked before anything recurses into it
    or keeps it, and small manifests served from the cache. Instance types and preferences go
    to api/instancetypes.py."""
    if instancetypes.declared_kind(raw):
        declared = instancetypes.declare_type(address, raw)
        return ExtractionProblem(address, declared) if isinstance(declared, str) else declared
    try:
        # msgspec's encoder, a tenth of json.dumps' time: this runs for every VM of every write.
        encoded = msgspec.json.encode(raw)
    except RecursionError:
        # Deeper than the interpreter's stack allows; _declare refuses far shallower ones.
        return _refused(address, raw, f"nested more than {MANIFEST_DEPTH_MAX} levels deep")
    if len(encoded) > MANIFEST_MAX_BYTES:
        return _refused(address, raw, f"larger than {MANIFEST_MAX_BYTES} bytes as JSON")
    if not cache or len(encoded) > CACHED_MANIFEST_MAX_BYTES:
        return _declare(address, raw)
    return _declare_cached(address, encoded)


@functools.lru_cache(maxsize=DECLARE_CACHE_SIZE)
def _declare_cached(address: str, encoded: bytes) -> DeclaredVM | ExtractionProblem:
    """`_declare`, remembered by the manifest's exact encoding: a state is written again and
    again with the same VMs (every apply, every serial bump), and validation is most of the cost.

    The cache spans projects and versions: a manifest met in any earlier write is not
    validated again, which includes every VM unchanged since the published version."""
    return _declare(address, msgspec.json.decode(encoded))


def _usable_name(address: str, raw: dict[str, Any]) -> str | ExtractionProblem:
    """The manifest's name, or the project problem that it has none an object could carry."""
    metadata = raw.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str):
        return ExtractionProblem(address, "metadata.name: a QemuVM needs a name")
    name_problem = names.dns_label_problem(name)
    if name_problem:
        return ExtractionProblem(address, f"metadata.name: {name[: names.QUOTED_MAX]!r} {name_problem}")
    return name


def _refused(address: str, raw: dict[str, Any], reason: str) -> DeclaredVM | ExtractionProblem:
    """A manifest refused whole: an invalid VM with an empty spec, or a problem if unnamed."""
    name = _usable_name(address, raw)
    if isinstance(name, ExtractionProblem):
        return ExtractionProblem(address, f"manifest: {reason}")
    return DeclaredVM(
        name=name,
        address=address,
        labels={},
        spec={},
        error=f"manifest: {reason}",
        spec_hash=_digest({"refused": reason}),
    )


def _declare(address: str, raw: dict[str, Any]) -> DeclaredVM | ExtractionProblem:
    if nesting_exceeds(raw, MANIFEST_DEPTH_MAX):
        return _refused(address, raw, f"nested more than {MANIFEST_DEPTH_MAX} levels deep")
    cleaned = drop_nulls(raw)
    assert isinstance(cleaned, dict)
    name = _usable_name(address, cleaned)
    if isinstance(name, ExtractionProblem):
        return name
    metadata = cleaned.get("metadata")
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
    spec = canonical_spec(manifest.spec)
    labels = dict(manifest.metadata.labels)
    return DeclaredVM(
        name=name,
        address=address,
        labels=labels,
        spec=spec,
        error=None,
        spec_hash=_digest({"spec": spec, "labels": labels}),
    )


def mark_duplicate_names(found: list[DeclaredVM]) -> tuple[DeclaredVM, ...]:
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
    name = resource.get("name")
    # Terraform writes a string name and a string or number key; anything else shows as "?"
    # rather than as the repr of whatever structure a hand-made state put there.
    address += f"{resource.get('type')}.{name if isinstance(name, str) else '?'}"
    if "index_key" in instance:
        key = instance["index_key"]
        if isinstance(key, str):
            address += f"[{json.dumps(key)}]"
        elif isinstance(key, int | float) and not isinstance(key, bool):
            address += f"[{key}]"
        else:
            address += "[?]"
    return address
