"""The QemuVM CRD: generated from the models, committed up to date, and structural.

Kubernetes' rules for structural schemas (kubernetes.io, "Extend the Kubernetes API with
CustomResourceDefinitions": "Specifying a structural schema", "Validation", "Defaulting",
"Controlling pruning", "IntOrString") are checked here by walking the schema. No `kubectl` or
`kube-apiserver` binary is available where these tests run, so nothing here applies the CRD to
a real apiserver; with one at hand, `kubectl apply --dry-run=server -f crds/qemuvm.yaml` is the
final word.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from api import crd
from api.testing.tfstate import manifest
from api.types import (
    AllocatedPort,
    Condition,
    ConditionStatus,
    ExitReason,
    LastExit,
    Phase,
    Protocol,
    QemuVMSpec,
    QemuVMStatus,
    RunOverride,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = REPO_ROOT / "crds" / "qemuvm.yaml"
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)

# The only places where the models accept arbitrary data: cloud-init's free-form documents, and
# the copies of instance type and preference specs the status keeps (api/instancetypes.py
# validates them when they are declared; status is written by the controller alone).
PRESERVE_UNKNOWN_FIELDS_AT = {
    "spec.cloudInit.userData",
    "spec.cloudInit.metaData",
    "spec.cloudInit.networkConfig",
    "status.instanceType.spec",
    "status.preference.spec",
}
# The quantities: an integer of MiB or seconds, or a string such as "2Gi" or "2m".
INT_OR_STRING_AT = {"spec.memory", "spec.disks[].size", "spec.stopTimeout"}
# What apiextensions.k8s.io/v1 JSONSchemaProps can hold, minus what v1 forbids (definitions,
# dependencies, deprecated, discriminator, id, patternProperties, readOnly, writeOnly, xml,
# $ref). `title` is allowed; the generator drops pydantic's anyway.
ALLOWED_KEYWORDS = {
    "description",
    "type",
    "format",
    "title",
    "default",
    "nullable",
    "enum",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "multipleOf",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "uniqueItems",
    "maxProperties",
    "minProperties",
    "required",
    "items",
    "properties",
    "additionalProperties",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "example",
    "externalDocs",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}
JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
}


def nodes(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node reachable through properties, additionalProperties and items."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from nodes(child, f"{path}.{name}" if path else name)
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}.*")
    if isinstance(schema.get("items"), dict):
        yield from nodes(schema["items"], f"{path}[]")


def keys_anywhere(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from keys_anywhere(item)
    elif isinstance(value, list):
        for item in value:
            yield from keys_anywhere(item)


def structural_problems(root: dict[str, Any]) -> list[str]:
    """Every way `root` breaks Kubernetes' rules for a v1 structural schema, as `path: rule`."""
    problems = [f"{key} anywhere" for key in set(keys_anywhere(root)) & {"$ref", "$defs", "$schema"}]
    for path, node in nodes(root, ""):
        problems += [f"{path}: {problem}" for problem in node_problems(path, node)]
    metadata = root.get("properties", {}).get("metadata", {})
    if metadata.get("type") != "object" or set(metadata.get("properties", {})) - {"name", "generateName"}:
        problems.append("metadata: must be an object constraining at most name and generateName")
    return problems


def node_problems(path: str, node: dict[str, Any]) -> Iterator[str]:
    yield from (f"keyword {key} not allowed in v1" for key in set(node) - ALLOWED_KEYWORDS)
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if "type" not in node and not (int_or_string or preserve is True):
        yield "needs a non-empty type"
    if "type" in node and node["type"] not in TYPES:
        yield f"type {node['type']!r} is not a single OpenAPI type"
    if int_or_string and "type" in node:
        yield "x-kubernetes-int-or-string takes no type"
    if preserve is not None and (preserve is not True or path not in PRESERVE_UNKNOWN_FIELDS_AT):
        yield "x-kubernetes-preserve-unknown-fields only true, and only on cloud-init's free-form data"
    if node.get("nullable") and "type" not in node:
        yield "nullable only beside a type"
    # Restricted forms would do, but the generator writes none: simpler for every client.
    yield from (f"{key} present" for key in ("anyOf", "allOf", "oneOf", "not") if key in node)
    if "items" in node and not isinstance(node["items"], dict):
        yield "items must be a single schema"
    if node.get("type") == "array" and "items" not in node:
        yield "an array needs items"
    if "additionalProperties" in node and (
        "properties" in node or not isinstance(node["additionalProperties"], dict)
    ):
        yield "additionalProperties: a schema, and never beside properties"
    if node.get("uniqueItems") is True:
        yield "uniqueItems: true is forbidden"
    if "enum" in node and not all(
        isinstance(value, JSON_TYPES[node.get("type", "string")]) for value in node["enum"]
    ):
        yield "enum values must have the node's type"
    if set(node.get("required", ())) - set(node.get("properties", {})):
        yield "required names a field that is not a property"
    if "default" in node and not is_valid(node["default"], node):
        yield f"default {node['default']!r} does not validate"


def as_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes schema node in JSON Schema (Draft 2020-12) terms, as an apiserver with
    strict field validation (`kubectl --validate=strict`, the default) reads it: unknown fields
    are errors unless kept on purpose, and `null` is a value only where `nullable`."""
    result: dict[str, Any] = {}
    if node.get("x-kubernetes-int-or-string"):
        result["type"] = ["integer", "string"]
    elif "type" in node:
        result["type"] = [node["type"], "null"] if node.get("nullable") else node["type"]
    if "enum" in node:
        result["enum"] = [*node["enum"], None] if node.get("nullable") else node["enum"]
    for key in (
        "maxItems",
        "minItems",
        "required",
        "minimum",
        "maximum",
        "maxLength",
        "minLength",
        "pattern",
    ):
        if key in node:
            result[key] = node[key]
    if "pattern" in node:
        # Kubernetes (Go RE2) and ECMA-262 end `$` at the end of the text; Python's `$` also
        # matches before a final newline, which `\Z` does not.
        result["pattern"] = node["pattern"].removesuffix("$") + "\\Z"
    if "properties" in node:
        result["properties"] = {name: as_json_schema(child) for name, child in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            result["additionalProperties"] = False
    if "additionalProperties" in node:
        result["additionalProperties"] = as_json_schema(node["additionalProperties"])
    if "items" in node:
        result["items"] = as_json_schema(node["items"])
    return result


def is_valid(value: Any, node: dict[str, Any]) -> bool:
    return bool(jsonschema.Draft202012Validator(as_json_schema(node)).is_valid(value))


@pytest.fixture(scope="module")
def generated() -> dict[str, Any]:
    return crd.generate()


@pytest.fixture(scope="module")
def root(generated: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def full_manifest() -> dict[str, Any]:
    return manifest(
        "db-01",
        labels={"tier": "db"},
        memory="2Gi",
        cpus=2,
        machine="microvm",
        stopTimeout="2m",
        disks=[
            {
                "name": "root",
                "image": "https://example.com/noble.img",
                "size": "20Gi",
                "reclaimPolicy": "Retain",
            }
        ],
        network={"forwards": [{"guestPort": 22}, {"protocol": "udp", "guestPort": 53, "hostPort": 5353}]},
        cloudInit={
            "userData": {"packages": ["postgresql"], "runcmd": [["echo", 1]]},
            "metaData": {"zone": {"name": "a", "weight": 2}},
            "networkConfig": None,
            "sshAuthorizedKeys": ["ssh-ed25519 AAAAC3Nza me@host"],
        },
    )


def full_status() -> dict[str, Any]:
    status = QemuVMStatus(
        phase=Phase.RUNNING,
        conditions=(
            Condition(type="Ready", status=ConditionStatus.TRUE, reason="Running", last_transition_time=NOW),
        ),
        observed_generation=3,
        pid=1234,
        ports=(AllocatedPort(protocol=Protocol.TCP, guest_port=22, host_port=40022),),
        started_at=NOW,
        last_exit=LastExit(reason=ExitReason.CRASHED, exit_code=1, at=NOW),
        override=RunOverride(stopped=True, requested_by="alice", updated_at=NOW),
    )
    return status.model_dump(mode="json", by_alias=True)


# ---- the committed file -------------------------------------------------------------------


def test_committed_crd_is_what_the_models_generate(generated: dict[str, Any]) -> None:
    """crds/qemuvm.yaml is up to date with api/types.py (else: run hack/gen-crds)."""
    assert CRD_FILE.exists(), "crds/qemuvm.yaml is missing: run hack/gen-crds"
    committed = CRD_FILE.read_text()
    assert yaml.safe_load(committed) == generated, "crds/qemuvm.yaml is stale: run hack/gen-crds"
    assert committed.startswith(crd.HEADER)


def test_gen_crds_check_fails_on_a_stale_file_and_writing_fixes_it(tmp_path: Path) -> None:
    """hack/gen-crds --check exits 1 with a diff for a stale file; after a write it exits 0."""
    output = tmp_path / "qemuvm.yaml"
    output.write_text(crd.HEADER + "kind: Stale\n")

    def gen_crds(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(REPO_ROOT / "hack" / "gen-crds"), "--output", str(output), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    stale = gen_crds("--check")
    assert stale.returncode == 1
    assert "-kind: Stale" in stale.stderr
    assert "is stale: run hack/gen-crds" in stale.stderr
    assert gen_crds().returncode == 0
    assert gen_crds("--check").returncode == 0
    assert output.read_text() == crd.render(crd.generate())


def test_rendering_is_deterministic_and_round_trips(generated: dict[str, Any]) -> None:
    """Two renders are byte-identical and parse back to the generated dict."""
    text = crd.render(crd.generate())
    assert text == crd.render(copy.deepcopy(generated))
    assert yaml.safe_load(text) == generated


# ---- the CRD around the schema --------------------------------------------------------------


def test_crd_names_scope_and_version(generated: dict[str, Any]) -> None:
    """A namespaced v1 CRD named qemuvms.tofu-qemu.dev with one served, stored version."""
    assert generated["apiVersion"] == "apiextensions.k8s.io/v1"
    assert generated["kind"] == "CustomResourceDefinition"
    assert generated["metadata"] == {"name": "qemuvms.tofu-qemu.dev"}
    spec = generated["spec"]
    assert spec["group"] == "tofu-qemu.dev"
    assert spec["names"] == {
        "kind": "QemuVM",
        "listKind": "QemuVMList",
        "plural": "qemuvms",
        "singular": "qemuvm",
        "shortNames": ["qvm"],
    }
    assert spec["scope"] == "Namespaced"
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns_point_at_fields_of_the_schema(
    generated: dict[str, Any], root: dict[str, Any]
) -> None:
    """Phase, Ready, Accel and Age read fields that the status schema (or metadata) has."""
    columns = {
        column["name"]: column for column in generated["spec"]["versions"][0]["additionalPrinterColumns"]
    }
    assert list(columns) == ["Phase", "Ready", "Accel", "Age"]
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    status = root["properties"]["status"]["properties"]
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert "phase" in status
    assert columns["Accel"]["jsonPath"] == ".status.accel"
    assert "accel" in status
    assert {"type", "status"} <= set(status["conditions"]["items"]["properties"])


# ---- structural rules -------------------------------------------------------------------------


def test_schema_is_structural(root: dict[str, Any]) -> None:
    """The whole schema follows Kubernetes' structural, pruning and defaulting rules."""
    assert structural_problems(root) == []


def test_top_level_has_the_kubernetes_object_fields(root: dict[str, Any]) -> None:
    """apiVersion, kind, metadata (an object with no properties), spec and status."""
    assert root["type"] == "object"
    assert list(root["properties"]) == ["apiVersion", "kind", "metadata", "spec", "status"]
    assert root["properties"]["metadata"] == {"type": "object"}


def test_free_form_and_quantity_nodes_are_exactly_the_expected_ones(root: dict[str, Any]) -> None:
    """Only cloud-init's documents keep unknown fields; only the quantities are int-or-string."""
    walked = list(nodes(root, ""))
    assert {path for path, node in walked if node.get("x-kubernetes-preserve-unknown-fields")} == (
        PRESERVE_UNKNOWN_FIELDS_AT
    )
    assert {path for path, node in walked if node.get("x-kubernetes-int-or-string")} == INT_OR_STRING_AT


def test_pydantic_titles_are_dropped_and_descriptions_kept(root: dict[str, Any]) -> None:
    """No pydantic `title` noise; field and model descriptions reach `kubectl explain`."""
    assert "title" not in set(keys_anywhere(root))
    spec = root["properties"]["spec"]
    assert (
        spec["properties"]["memory"]["description"]
        == 'MiB, or a quantity like "2Gi". Between 16 and 1048576.'
    )
    assert spec["properties"]["cpus"]["description"] == "Between 1 and 64."
    assert spec["properties"]["boot"]["description"].startswith("Direct kernel boot")


def test_spec_defaults_are_the_canonical_ones(root: dict[str, Any]) -> None:
    """The spec's defaults equal the canonical spec's; status has none."""
    spec = root["properties"]["spec"]["properties"]
    defaults = {name: node["default"] for name, node in spec.items() if "default" in node}
    canonical = QemuVMSpec.model_validate({"boot": {"kernel": "k"}}).model_dump(mode="json", by_alias=True)
    assert defaults == {name: canonical[name] for name in defaults}
    assert set(defaults) >= {"cpus", "memory", "machine", "accel", "runStrategy", "stopTimeout"}
    status = root["properties"]["status"]
    assert not [path for path, node in nodes(status, "status") if "default" in node]


def test_the_checker_catches_what_kubernetes_refuses() -> None:
    """The structural checker reports each kind of schema an apiserver refuses."""
    bad = {
        "type": "object",
        "properties": {
            "metadata": {"type": "object", "properties": {"labels": {"type": "object"}}},
            "a": {"$ref": "#/$defs/A"},
            "b": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "c": {"type": "object", "properties": {"x": {"type": "string"}}, "additionalProperties": False},
            "d": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "e": {"nullable": True, "x-kubernetes-int-or-string": True},
            "f": {"type": "array", "items": [{"type": "string"}], "uniqueItems": True},
        },
    }
    problems = "\n".join(structural_problems(bad))
    for expected in (
        "$ref anywhere",
        "a: keyword $ref",
        "b: needs a non-empty type",
        "b: anyOf present",
        "c: additionalProperties",
        "d: x-kubernetes-preserve-unknown-fields",
        "e: nullable only beside a type",
        "f: items must be a single schema",
        "f: uniqueItems",
        "metadata: must be an object",
    ):
        assert expected in problems


def test_unexpressible_models_fail_generation() -> None:
    """A union Kubernetes cannot express, an unknown keyword or a tuple raises instead of loosening."""
    with pytest.raises(crd.UnsupportedSchemaError, match=r"spec\.x: a union"):
        crd.structural(
            {"anyOf": [{"type": "string"}, {"type": "boolean"}]}, path="spec.x", keep_defaults=True
        )
    with pytest.raises(crd.UnsupportedSchemaError, match="patternProperties"):
        crd.structural({"type": "object", "patternProperties": {}}, path="spec.y", keep_defaults=True)
    with pytest.raises(crd.UnsupportedSchemaError, match="prefixItems"):
        crd.structural({"type": "array", "prefixItems": []}, path="spec.z", keep_defaults=True)
    with pytest.raises(crd.UnsupportedSchemaError, match="one schema for all its items"):
        crd.structural({"type": "array"}, path="spec.z", keep_defaults=True)


# ---- objects against the schema --------------------------------------------------------------


def test_builder_manifest_and_a_full_manifest_validate(root: dict[str, Any]) -> None:
    """What users write (quantities as strings, free-form cloud-init) passes the CRD's schema."""
    for example in (manifest("web-01"), full_manifest()):
        QemuVMSpec.model_validate(example["spec"])  # the models accept it too
        jsonschema.validate(example, as_json_schema(root))


def test_statuses_the_controller_writes_validate(root: dict[str, Any]) -> None:
    """A default status and a full one, serialised as the controller writes them, pass."""
    status_schema = as_json_schema(root["properties"]["status"])
    for status in (QemuVMStatus().model_dump(mode="json", by_alias=True), full_status()):
        jsonschema.validate(status, status_schema)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("machine", "pc", id="enum"),
        pytest.param("cpus", "2", id="integer-as-string"),
        pytest.param("memory", [512], id="quantity-as-list"),
        pytest.param("memroy", 512, id="unknown-field"),
        pytest.param("disks", [{"image": "a.img"}], id="disk-without-name"),
        pytest.param("network", {"forwards": [{"guestPort": 22}] * 33}, id="too-many-forwards"),
        pytest.param("boot", "vmlinuz", id="object-as-string"),
    ],
)
def test_wrong_shapes_fail(root: dict[str, Any], field: str, value: Any) -> None:
    """A spec of the wrong shape fails the CRD's schema."""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest("web-01", **{field: value}), as_json_schema(root))


DIGEST = "a" * 64
KERNEL = {"kernel": "tiny-guest/vmlinuz"}
# (spec overrides, accepted?): each is judged the same by the model and by the CRD's schema.
VALIDATOR_CASES = [
    ({"memory": 16}, True),
    ({"memory": 8}, False),
    ({"memory": 1024 * 1024 + 1}, False),
    ({"cpus": 64}, True),
    ({"cpus": 0}, False),
    ({"cpus": 65}, False),
    ({"stopTimeout": 3601}, False),
    ({"network": {"forwards": [{"guestPort": 0}]}}, False),
    ({"network": {"forwards": [{"guestPort": 80, "hostPort": 1023}]}}, False),
    ({"network": {"forwards": [{"guestPort": 80, "hostPort": 1024}]}}, True),
    ({"boot": {"kernel": "../etc/passwd"}}, False),
    ({"boot": {"kernel": "/abs"}}, False),
    ({"boot": {"kernel": "k,if=none"}}, False),
    ({"boot": {"kernel": "a" * 256}}, False),
    ({"boot": {**KERNEL, "cmdline": "console=ttyS0\n"}}, False),
    ({"boot": {**KERNEL, "cmdline": "x" * 2049}}, False),
    ({"disks": [{"name": "Root", "size": 10}]}, False),
    ({"disks": [{"name": "r" * 64, "size": 10}]}, False),
    ({"disks": [{"name": "root-1", "size": 0}]}, False),
    ({"disks": [{"name": "root", "image": f"sha256:{DIGEST}"}]}, True),
    ({"disks": [{"name": "root", "image": "sha256:xyz"}]}, False),
    ({"disks": [{"name": "root", "image": "https://example.test/i.img", "sha256": DIGEST.upper()}]}, True),
    ({"disks": [{"name": "root", "image": "https://example.test/i.img", "sha256": "abc"}]}, False),
    ({"cloudInit": {"sshAuthorizedKeys": ["ssh-ed25519 AAAAC3Nz me@host"]}}, True),
    ({"cloudInit": {"sshAuthorizedKeys": ["not a key"]}}, False),
]


@pytest.mark.parametrize(
    ("spec", "accepted"), VALIDATOR_CASES, ids=[str(case) for case, _ in VALIDATOR_CASES]
)
def test_the_crd_refuses_what_the_models_refuse(
    root: dict[str, Any], spec: dict[str, Any], accepted: bool
) -> None:
    """The validators' ranges, patterns and lengths are in the schema (api/types.py
    VALIDATOR_SCHEMAS): an apiserver with the CRD judges each value as tofu-qemu does."""
    document = manifest("web-01", **spec)
    model_accepts = True
    try:
        QemuVMSpec.model_validate(document["spec"])
    except ValidationError:
        model_accepts = False
    assert (model_accepts, is_valid(document, root)) == (accepted, accepted)


def test_missing_spec_fails(root: dict[str, Any]) -> None:
    """spec is required, as in QemuVMManifest."""
    with pytest.raises(jsonschema.ValidationError, match="spec"):
        jsonschema.validate({"apiVersion": "tofu-qemu.dev/v1alpha1", "kind": "QemuVM"}, as_json_schema(root))
