"""Builders for Terraform state documents shaped exactly like the ones Terraform 1.11 writes.

The shapes (module addresses, count/for_each index keys, the dynamic `input` wrapper, deposed
and tainted instances) follow the real Terraform states in tests/fixtures/tfstate and
docs/backend.md#the-state-document.
"""

from __future__ import annotations

import copy
import json
from typing import Any

LINEAGE = "293de8df-eeef-85bb-f180-15b975114385"
TERRAFORM_PROVIDER = 'provider["terraform.io/builtin/terraform"]'


def manifest(name: str, *, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A QemuVM manifest with a bootable default spec, overridden by `spec`."""
    full_spec: dict[str, Any] = {"memory": 256, "boot": {"kernel": "tiny-guest/vmlinuz"}}
    full_spec.update(spec)
    metadata: dict[str, Any] = {"name": name}
    if labels is not None:
        metadata["labels"] = labels
    return {"apiVersion": "tofu-qemu.dev/v1alpha1", "kind": "QemuVM", "metadata": metadata, "spec": full_spec}


def instance(input_value: Any, *, index_key: int | str | None = None, **extra: Any) -> dict[str, Any]:
    """A terraform_data instance whose `input` is stored as Terraform's dynamic wrapper."""
    wrapped = None if input_value is None else {"value": input_value, "type": "dynamic"}
    result: dict[str, Any] = {
        "schema_version": 0,
        "attributes": {
            "id": "0f0e",
            "input": wrapped,
            "output": copy.deepcopy(wrapped),
            "triggers_replace": None,
        },
        "sensitive_attributes": [],
    }
    if index_key is not None:
        result["index_key"] = index_key
    result.update(extra)
    return result


def resource(
    name: str, instances: list[dict[str, Any]], *, module: str | None = None, type_: str = "terraform_data"
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "mode": "managed",
        "type": type_,
        "name": name,
        "provider": TERRAFORM_PROVIDER,
        "instances": instances,
    }
    if module:
        result["module"] = module
    return result


def state(serial: int, resources: list[dict[str, Any]], *, lineage: str = LINEAGE) -> dict[str, Any]:
    return {
        "version": 4,
        "terraform_version": "1.11.4",
        "serial": serial,
        "lineage": lineage,
        "outputs": {},
        "resources": resources,
        "check_results": None,
    }


def vm_state(serial: int, vms: dict[str, dict[str, Any]], *, lineage: str = LINEAGE) -> dict[str, Any]:
    """A state declaring one for_each resource `terraform_data.vm` with one VM per entry."""
    instances = [instance(manifest(name, **spec), index_key=name) for name, spec in vms.items()]
    return state(serial, [resource("vm", instances)] if instances else [], lineage=lineage)


def encode(document: dict[str, Any]) -> bytes:
    """Serialise as Terraform does: 2-space indent and a trailing newline."""
    return (json.dumps(document, indent=2) + "\n").encode()
