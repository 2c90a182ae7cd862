"""Reading a state write incrementally: parse_state and extract_vms in one pass that neither
decodes nor validates a resource instance whose bytes it has met before.

Pure. Terraform rewrites the whole state on every apply, byte for byte the same wherever nothing
changed. So the body is split into raw JSON slices (its top-level values, each resource's values,
each resource instance) and each instance slice is looked up by its bytes and the resource it
belongs to: an instance seen before is neither decoded again nor validated again
(its bytes passed the strict checks then); only new or changed instances are. The result is the
one parse_state + extract_vms give, and any body that is not the usual shape, or that anything
refuses, goes through them instead, so every error message and every odd case is theirs.

The cache is bounded in bytes of instance slices (the results it keeps are smaller than the
slices that produced them) and shared by every project: it also serves a project whose VMs are
identical to another's, or a write that goes back to an older version.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any

import msgspec

from api import tfstate
from api.json_body import StateFormatError
from api.tfstate import (
    Extraction,
    StateSummary,
    declare_bounded,
    declares_vms,
    extract_vms,
    extraction_of,
    manifest_candidate,
    parse_state,
    summarize,
)

# Instance slices remembered (they are the keys), in bytes. The bench's 10,000-VM state is
# 41 MB. Bounded, so that distinct hostile states cost memory in proportion to this, not to
# what was posted.
INSTANCE_CACHE_BYTES = 64 * 1024 * 1024
# A larger slice is decoded every time (its manifest alone is refused past 64 KiB).
CACHED_INSTANCE_MAX_BYTES = 256 * 1024

Declared = tfstate.Declared | None
_ANY = msgspec.json.Decoder()


class _Resource(msgspec.Struct, forbid_unknown_fields=True):
    """A resource as Terraform 1.x and OpenTofu write it, its instances left as raw slices."""

    mode: Any = msgspec.UNSET
    type: Any = msgspec.UNSET
    name: Any = msgspec.UNSET
    provider: Any = msgspec.UNSET
    module: Any = msgspec.UNSET
    each: Any = msgspec.UNSET
    instances: list[msgspec.Raw] | msgspec.UnsetType = msgspec.UNSET


class _State(msgspec.Struct, forbid_unknown_fields=True):
    """A plain state's top level: one decode that leaves every instance a raw slice. Any other
    field (an encrypted envelope's, a future version's) makes it read the usual way."""

    version: Any = msgspec.UNSET
    terraform_version: Any = msgspec.UNSET
    serial: Any = msgspec.UNSET
    lineage: Any = msgspec.UNSET
    outputs: Any = msgspec.UNSET
    check_results: Any = msgspec.UNSET
    resources: list[_Resource] | msgspec.UnsetType = msgspec.UNSET


_STATE = msgspec.json.Decoder(_State)


def _present(value: msgspec.Struct) -> dict[str, Any]:
    """The fields the body had, as the dict a plain decode gives (absent is not null)."""
    return {
        field: item
        for field in value.__struct_fields__
        if (item := getattr(value, field)) is not msgspec.UNSET
    }


class _NotTheUsualShape(Exception):
    """The body is valid JSON, maybe, but not laid out as a plain state: read it the usual way."""


class _InstanceCache:
    """What each instance slice declared, keyed by its resource and its bytes; least recently
    used evicted first. The parse runs in a small thread pool, hence the lock."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[tuple[bytes, bytes], Declared] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[bytes, bytes]) -> tuple[Declared] | None:
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return (self._entries[key],)

    def put(self, key: tuple[bytes, bytes], declared: Declared) -> None:
        size = len(key[0]) + len(key[1])
        if size > CACHED_INSTANCE_MAX_BYTES:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = declared
            self._bytes += size
            while self._bytes > self._max_bytes:
                (prefix, raw), _ = self._entries.popitem(last=False)
                self._bytes -= len(prefix) + len(raw)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


_CACHE = _InstanceCache(INSTANCE_CACHE_BYTES)


def read_state(body: bytes) -> tuple[StateSummary, Extraction | None]:
    """parse_state, and extract_vms for a plain (not encrypted) state.

    The summary's `document` holds the state's top-level values but not its resources, which
    are read as raw slices.

    :raise StateFormatError: as parse_state.
    """
    try:
        return _read_incrementally(body)
    except (msgspec.DecodeError, RecursionError, StateFormatError, _NotTheUsualShape):
        summary = parse_state(body)
        if summary.is_encrypted:
            return summary, None
        return summary, extract_vms(summary.document, cache=summary.strict)


def _read_incrementally(body: bytes) -> tuple[StateSummary, Extraction]:
    state = _STATE.decode(body)
    if state.resources is msgspec.UNSET:
        raise _NotTheUsualShape
    head = _present(state)
    del head["resources"]
    # Checked as if resources were an empty list: a list is all parse_state asks of them.
    summary = summarize({**head, "resources": []}, strict=True)
    extraction = extraction_of(
        declared
        for resource in state.resources
        for declared in _resource_declares(resource)
        if declared is not None
    )
    return dataclasses.replace(summary, document=head), extraction


def _resource_declares(resource: _Resource) -> list[Declared]:
    """What each instance of one resource declares (None for most resources: not a VM)."""
    if resource.instances is msgspec.UNSET:
        return []
    context = _present(resource)
    del context["instances"]
    # Everything of the resource but its instances goes into each instance's key: the address
    # and the kind of manifest depend on it. Encoded from strictly decoded values: canonical.
    prefix = msgspec.json.encode(context)
    may_declare = declares_vms(context)
    return [_instance_declares(context, (prefix, bytes(raw)), may_declare) for raw in resource.instances]


def _instance_declares(context: dict[str, Any], key: tuple[bytes, bytes], may_declare: bool) -> Declared:
    """What one instance slice declares: remembered (keyed by the exact bytes, so no two slices
    can share an entry), or decoded strictly, whatever resource it belongs to, and validated."""
    cached = _CACHE.get(key)
    if cached is not None:
        return cached[0]
    instance = _ANY.decode(key[1])
    candidate = manifest_candidate(context, instance) if may_declare else None
    declared = None if candidate is None else declare_bounded(*candidate, cache=False)
    _CACHE.put(key, declared)
    return declared
