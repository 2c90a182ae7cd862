"""The instance type and preference CRDs (api/instancetypes_crd.py): committed as generated,
structural like the QemuVM's, and as strict as the models (docs/instancetypes.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from api import instancetypes_crd
from tests.unit.test_crd import is_valid, structural_problems

CRDS = Path(__file__).resolve().parents[2] / "crds"
GENERATED = instancetypes_crd.generate()


@pytest.mark.parametrize("file_name", sorted(GENERATED))
def test_committed_crds_are_what_the_models_generate(file_name: str) -> None:
    committed = CRDS / file_name
    assert committed.exists(), f"crds/{file_name} is missing: run hack/gen-crds"
    assert yaml.safe_load(committed.read_text()) == GENERATED[file_name], (
        f"crds/{file_name} is stale: run hack/gen-crds"
    )


@pytest.mark.parametrize("file_name", sorted(GENERATED))
def test_each_schema_is_structural(file_name: str) -> None:
    [version] = GENERATED[file_name]["spec"]["versions"]
    assert structural_problems(version["schema"]["openAPIV3Schema"]) == []


def spec_schema(file_name: str) -> dict[str, Any]:
    [version] = GENERATED[file_name]["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


@pytest.mark.parametrize(
    ("file_name", "spec", "valid"),
    [
        ("qemuinstancetypes.yaml", {"cpus": 2, "memory": "1Gi"}, True),
        ("qemuinstancetypes.yaml", {"cpus": 2}, False),
        ("qemuinstancetypes.yaml", {"cpus": 65, "memory": 64}, False),
        ("qemuclusterinstancetypes.yaml", {"cpus": 1, "memory": 8}, False),
        ("qemupreferences.yaml", {"machine": "microvm", "stopTimeout": "1m"}, True),
        ("qemuclusterpreferences.yaml", {"machine": "pc"}, False),
    ],
)
def test_the_schemas_refuse_what_the_models_refuse(file_name: str, spec: dict[str, Any], valid: bool) -> None:
    assert is_valid(spec, spec_schema(file_name)) is valid


def test_scopes_and_names() -> None:
    scopes = {name: crd["spec"]["scope"] for name, crd in GENERATED.items()}
    assert scopes == {
        "qemuinstancetypes.yaml": "Namespaced",
        "qemupreferences.yaml": "Namespaced",
        "qemuclusterinstancetypes.yaml": "Cluster",
        "qemuclusterpreferences.yaml": "Cluster",
    }
