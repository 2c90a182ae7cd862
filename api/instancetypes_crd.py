"""The CustomResourceDefinitions of instance types and preferences (docs/instancetypes.md),
generated from the same models as their validation, by the converter that makes the QemuVM's
(api/crd.py). Pure. `hack/gen-crds` writes them beside crds/qemuvm.yaml.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from api import crd
from api.instancetypes import QemuInstanceTypeSpec, QemuPreferenceSpec
from api.spec_fields import (
    CLUSTER_INSTANCE_TYPE_KIND,
    CLUSTER_PREFERENCE_KIND,
    INSTANCE_TYPE_KIND,
    PREFERENCE_KIND,
)
from api.types import API_GROUP

Schema = dict[str, Any]

# (kind, plural, short name, namespaced, spec model, what it is)
_KINDS: tuple[tuple[str, str, str, bool, type[BaseModel], str], ...] = (
    (INSTANCE_TYPE_KIND, "qemuinstancetypes", "qit", True, QemuInstanceTypeSpec,
     "The cpus and memory of the VMs that reference it, declared in a project's state."),
    (PREFERENCE_KIND, "qemupreferences", "qpref", True, QemuPreferenceSpec,
     "Defaults for the VMs that reference it, declared in a project's state."),
    (CLUSTER_INSTANCE_TYPE_KIND, "qemuclusterinstancetypes", "qcit", False, QemuInstanceTypeSpec,
     "A cluster-wide instance type, from the server's config file."),
    (CLUSTER_PREFERENCE_KIND, "qemuclusterpreferences", "qcpref", False, QemuPreferenceSpec,
     "A cluster-wide preference, from the server's config file."),
)  # fmt: skip

_STATUS: Schema = {
    "type": "object",
    "properties": {
        "revision": {
            "type": "string",
            "description": "A digest of the spec: what VMs record as the revision",
        },
        "conditions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {name: {"type": "string"} for name in ("type", "status", "reason", "message")},
                "required": ["type", "status", "reason"],
            },
        },
    },
}


def type_crd(
    kind: str,
    plural: str,
    short: str,
    namespaced: bool,
    model: type[BaseModel],
    about: str,
    *,
    status: Schema = _STATUS,
) -> Schema:
    """The CRD of a read-only kind whose spec is `model` (snapshots use it too, with their status)."""
    spec = crd.structural(crd.model_schema(model, "validation"), path="spec", keep_defaults=True)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": plural.removesuffix("s"),
                "shortNames": [short],
            },
            "scope": "Namespaced" if namespaced else "Cluster",
            "versions": [
                {
                    "name": crd.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "description": about,
                            "type": "object",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                            "required": ["spec"],
                        }
                    },
                    "subresources": {"status": {}},
                }
            ],
        },
    }


def generate() -> dict[str, Schema]:
    """Each CRD by the file name it is written to under crds/."""
    return {
        f"{plural}.yaml": type_crd(kind, plural, short, ns, model, about)
        for kind, plural, short, ns, model, about in _KINDS
    }
