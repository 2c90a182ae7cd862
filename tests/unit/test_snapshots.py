"""QemuVMSnapshot and QemuVMRestore as declared and shown (api/snapshots.py, docs/snapshots.md):
found in a state beside VMs, kept with their error when wrong (the state is never refused), as
Kubernetes objects and tables, in discovery, and in CRDs as strict as the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from api import kube, snapshots_crd
from api.client.snapshots import vm_restore_argv
from api.server.snapshots import table_columns
from api.snapshots import RESTORE_KIND, SNAPSHOT_KIND, to_object
from api.tfstate import extract_vms
from controller.cli import build_parser
from tests.unit.test_crd import is_valid, structural_problems
from tests.unit.test_instancetypes import BOOT, manifest, state

CRDS = Path(__file__).resolve().parents[2] / "crds"
GENERATED = snapshots_crd.generate()


def test_snapshots_and_restores_are_extracted_beside_vms() -> None:
    extraction = extract_vms(
        state(
            manifest("QemuVM", "web", {"boot": BOOT}),
            manifest(SNAPSHOT_KIND, "before", {"source": {"name": "web"}}),
            manifest(RESTORE_KIND, "undo", {"target": {"name": "web"}, "snapshot": "before"}),
        )
    )
    assert [vm.name for vm in extraction.vms] == ["web"]
    assert [(t.kind, t.name, t.spec, t.error) for t in extraction.types] == [
        (SNAPSHOT_KIND, "before", {"source": {"name": "web"}}, None),
        (RESTORE_KIND, "undo", {"target": {"name": "web"}, "snapshot": "before"}, None),
    ]


@pytest.mark.parametrize(
    ("kind", "spec", "error"),
    [
        (SNAPSHOT_KIND, {}, "spec.source: Field required"),
        (SNAPSHOT_KIND, {"source": {"name": "Web"}}, "spec.source.name"),
        (SNAPSHOT_KIND, {"source": {"name": "web"}, "ram": True}, "spec.ram: Extra inputs"),
        (RESTORE_KIND, {"target": {"name": "web"}}, "spec.snapshot: Field required"),
        (RESTORE_KIND, {"target": {"name": "web"}, "snapshot": "a b"}, "spec.snapshot"),
    ],
)
def test_a_wrong_spec_is_kept_with_its_error_and_the_state_accepted(
    kind: str, spec: dict[str, Any], error: str
) -> None:
    extraction = extract_vms(state(manifest("QemuVM", "web", {"boot": BOOT}), manifest(kind, "s", spec)))
    [declared] = extraction.types
    assert declared.error is not None
    assert error in declared.error
    assert extraction.problems == ()
    shown = to_object(kind, project="p", name="s", spec={}, error=declared.error, status=None)
    assert shown["status"]["conditions"][0]["status"] == "False"
    assert error in shown["status"]["error"]


def test_a_name_declared_twice_is_an_error_on_the_first() -> None:
    extraction = extract_vms(
        state(
            manifest(SNAPSHOT_KIND, "twice", {"source": {"name": "a"}}),
            manifest(SNAPSHOT_KIND, "twice", {"source": {"name": "b"}}),
        )
    )
    [declared] = extraction.types
    assert declared.error is not None
    assert "declared 2 times" in declared.error


def test_an_object_before_the_controller_wrote_its_status() -> None:
    shown = to_object(
        SNAPSHOT_KIND, project="p", name="s", spec={"source": {"name": "web"}}, error=None, status=None
    )
    assert shown["status"]["readyToUse"] is False
    assert shown["status"]["indications"] == []
    row = [column.cell(shown) for column in table_columns(SNAPSHOT_KIND)]
    assert row == ["s", "web", False, None, "<none>"]


def test_discovery_lists_them_beside_qemuvms() -> None:
    names = {resource["name"]: resource for resource in kube.qemuvm_resources()["resources"]}
    assert names["qemuvmsnapshots"]["kind"] == SNAPSHOT_KIND
    assert names["qemuvmrestores"]["shortNames"] == ["vmrestore"]
    assert names["qemuvmsnapshots"]["verbs"] == ["get", "list"]


@pytest.mark.parametrize("file_name", sorted(GENERATED))
def test_committed_crds_are_what_the_models_generate(file_name: str) -> None:
    committed = CRDS / file_name
    assert committed.exists(), f"crds/{file_name} is missing: run hack/gen-crds"
    assert yaml.safe_load(committed.read_text()) == GENERATED[file_name], f"crds/{file_name} is stale"
    [version] = GENERATED[file_name]["spec"]["versions"]
    # status.sourceSpec is the QemuVM's spec schema (tested as such): free-form cloud-init there too.
    allowed = tuple(
        f"status.sourceSpec.cloudInit.{key}:" for key in ("userData", "metaData", "networkConfig")
    )
    problems = structural_problems(version["schema"]["openAPIV3Schema"])
    assert [problem for problem in problems if not problem.startswith(allowed)] == []


@pytest.mark.parametrize(
    ("file_name", "spec", "valid"),
    [
        ("qemuvmsnapshots.yaml", {"source": {"name": "web"}}, True),
        ("qemuvmsnapshots.yaml", {"source": {}}, False),
        ("qemuvmsnapshots.yaml", {"source": {"name": "Web"}}, False),
        ("qemuvmrestores.yaml", {"target": {"name": "web"}, "snapshot": "s.1"}, True),
        ("qemuvmrestores.yaml", {"target": {"name": "web"}}, False),
    ],
)
def test_the_schemas_refuse_what_the_models_refuse(file_name: str, spec: dict[str, Any], valid: bool) -> None:
    [version] = GENERATED[file_name]["spec"]["versions"]
    assert is_valid(spec, version["schema"]["openAPIV3Schema"]["properties"]["spec"]) is valid


def test_restore_vm_is_told_apart_from_the_stores_restore() -> None:
    parser = build_parser()
    vm = parser.parse_args(vm_restore_argv(["restore", "vm", "web", "--snapshot", "before", "-p", "lab"]))
    assert (vm.command, vm.name, vm.snapshot, vm.project) == ("restore-vm", "web", "before", "lab")
    store = parser.parse_args(vm_restore_argv(["restore", "backup.db", "--force"]))
    assert (store.command, str(store.file), store.force) == ("restore", "backup.db", True)
    taken = parser.parse_args(["snapshot", "vm", "web", "before", "-p", "lab"])
    assert (taken.command, taken.name, taken.snapshot) == ("snapshot", "web", "before")
    deleted = parser.parse_args(["delete", "snapshot", "before", "-p", "lab"])
    assert (deleted.resource, deleted.name) == ("snapshot", "before")
