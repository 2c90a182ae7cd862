"""Instance types and preferences, pure: extraction from a state, merge rules, conflicts, and
when a VM keeps or takes a revision (api/instancetypes.py, controller/instancetypes.py)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from api.client.describe import describe_vm
from api.infra.settings import ProcessSettings, SettingsError, load_settings
from api.instancetypes import (
    COMMON_INSTANCE_TYPES,
    Found,
    Ref,
    Wanted,
    cluster_types,
    resolve,
    revision_of,
)
from api.state_reader import read_state
from api.tfstate import extract_vms
from api.types import FrozenRevision, QemuVMStatus
from api.vm_columns import VM_TABLE_COLUMNS
from controller.instancetypes import revision_events, stamp
from controller.settings import ServeSettings

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
BOOT = {"kernel": "tiny-guest/vmlinuz"}
SMALL = Ref("QemuInstanceType", "small")
LINUX = Ref("QemuPreference", "linux")


def state(*manifests: dict[str, Any]) -> dict[str, Any]:
    resources = [
        {
            "mode": "managed",
            "type": "terraform_data",
            "name": f"r{index}",
            "instances": [{"attributes": {"input": {"value": manifest, "type": "dynamic"}}}],
        }
        for index, manifest in enumerate(manifests)
    ]
    return {"version": 4, "serial": 1, "lineage": "l", "resources": resources}


def manifest(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "tofu-qemu.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def vm_spec(raw: dict[str, Any]) -> dict[str, Any]:
    [vm] = extract_vms(state(manifest("QemuVM", "vm", {"boot": BOOT, **raw})), cache=False).vms
    assert vm.error is None, vm.error
    return vm.spec


def frozen(ref: Ref, spec: dict[str, Any], *, generation: int = 1, at: datetime = T0) -> FrozenRevision:
    return FrozenRevision(
        kind=ref.kind,
        name=ref.name,
        revision=revision_of(spec),
        spec=spec,
        generation=generation,
        taken_at=at,
    )


def wanted(spec: dict[str, Any], **changes: Any) -> Wanted:
    fields: dict[str, Any] = {
        "project": "lab",
        "vm_spec": spec,
        "generation": 1,
        "frozen_type": None,
        "frozen_preference": None,
        "rollout_requested_at": None,
    }
    return Wanted(**(fields | changes))


# ---- Extraction -------------------------------------------------------------------------------


def test_types_are_extracted_beside_vms_and_never_taken_for_vms() -> None:
    extraction = extract_vms(
        state(
            manifest("QemuInstanceType", "u2.small", {"cpus": 2, "memory": "1Gi"}),
            manifest("QemuPreference", "linux", {"machine": "q35", "stopTimeout": "1m"}),
            manifest("QemuVM", "vm", {"boot": BOOT, "instanceType": {"name": "u2.small"}}),
        )
    )
    assert [vm.name for vm in extraction.vms] == ["vm"]
    assert [(t.kind, t.name, t.spec, t.error) for t in extraction.types] == [
        ("QemuInstanceType", "u2.small", {"cpus": 2, "memory": 1024}, None),
        ("QemuPreference", "linux", {"machine": "q35", "stopTimeout": 60}, None),
    ]


@pytest.mark.parametrize(
    ("kind", "spec", "error"),
    [
        ("QemuInstanceType", {"cpus": 2}, "spec.memory: Field required"),
        ("QemuInstanceType", {"cpus": 2, "memory": 8}, "spec.memory: must be ≥ 16 MiB"),
        ("QemuInstanceType", {"cpus": 2, "memory": 64, "machine": "q35"}, "spec.machine: Extra inputs"),
        ("QemuPreference", {"cpus": 2}, "spec.cpus: Extra inputs"),
        ("QemuPreference", {"machine": "pc"}, "spec.machine: Input should be 'q35' or 'microvm'"),
    ],
)
def test_an_invalid_type_is_kept_with_its_error(kind: str, spec: dict[str, Any], error: str) -> None:
    [declared] = extract_vms(state(manifest(kind, "t", spec))).types
    assert declared.error is not None
    assert error in declared.error


def test_a_type_without_a_usable_name_is_a_project_problem_and_duplicates_an_error() -> None:
    extraction = extract_vms(
        state(
            manifest("QemuInstanceType", "Bad_Name", {"cpus": 1, "memory": 64}),
            manifest("QemuInstanceType", "twice", {"cpus": 1, "memory": 64}),
            manifest("QemuInstanceType", "twice", {"cpus": 2, "memory": 64}),
        )
    )
    assert "metadata.name" in extraction.problems[0].message
    [twice] = extraction.types
    assert twice.error is not None
    assert "declared 2 times" in twice.error


def test_the_stored_spec_keeps_only_what_a_vm_with_a_type_set_itself() -> None:
    """Without references the canonical form is unchanged (every default written): VMs declared
    before instance types existed keep their spec hash and generation."""
    plain = vm_spec({})
    assert {"cpus", "memory", "machine", "stopTimeout"} <= set(plain)
    assert "instanceType" not in plain
    assert "preference" not in plain
    typed = vm_spec({"instanceType": {"name": "small"}, "machine": "q35"})
    assert typed["instanceType"] == {"name": "small", "kind": "QemuInstanceType"}
    assert "machine" in typed
    assert not {"cpus", "memory", "accel", "runStrategy", "stopTimeout", "cloudInit"} & set(typed)


# ---- Merge rules --------------------------------------------------------------------------------


def test_type_sets_size_preference_gives_defaults_the_vm_overrides() -> None:
    spec = vm_spec({"instanceType": {"name": "small"}, "preference": {"name": "linux"}, "stopTimeout": 5})
    current = {
        SMALL: Found({"cpus": 2, "memory": 256}),
        LINUX: Found({"machine": "microvm", "stopTimeout": 90, "accel": "tcg"}),
    }
    resolution = resolve(wanted(spec), current, T0)
    assert resolution.error is None
    assert resolution.spec is not None
    effective = resolution.spec
    assert (effective.cpus, effective.memory) == (2, 256)
    assert (effective.machine.value, effective.accel.value, effective.stop_timeout) == ("microvm", "tcg", 5)


def test_cloud_init_defaults_merge_key_by_key() -> None:
    spec = vm_spec({"preference": {"name": "linux"}, "cloudInit": {"userData": "#cloud-config\n{}"}})
    preference = {"cloudInit": {"metaData": {"zone": "a"}, "userData": "default"}}
    resolution = resolve(wanted(spec), {LINUX: Found(preference)}, T0)
    assert resolution.spec is not None
    assert resolution.spec.cloud_init is not None
    assert resolution.spec.cloud_init.user_data == "#cloud-config\n{}"
    assert resolution.spec.cloud_init.meta_data == {"zone": "a"}


@pytest.mark.parametrize(
    ("own", "fields"),
    [
        ({"cpus": 2}, ["spec.cpus"]),
        ({"memory": "1Gi"}, ["spec.memory"]),
        ({"cpus": 1, "memory": 64}, ["spec.cpus", "spec.memory"]),
    ],
)
def test_a_vm_may_not_set_what_its_type_sets(own: dict[str, Any], fields: list[str]) -> None:
    spec = vm_spec({"instanceType": {"name": "small"}, **own})
    resolution = resolve(wanted(spec), {SMALL: Found({"cpus": 1, "memory": 64})}, T0)
    assert resolution.spec is None
    assert resolution.error is not None
    for field in fields:
        assert f"{field}: set by QemuInstanceType 'small'" in resolution.error


@pytest.mark.parametrize(
    ("current", "message"),
    [
        ({}, "spec.instanceType: QemuInstanceType 'small' not found in project 'lab'"),
        (
            {SMALL: Found({}, "spec.memory: Field required")},
            "QemuInstanceType 'small' is invalid: spec.memory",
        ),
    ],
)
def test_an_unknown_or_invalid_type_makes_the_spec_invalid(current: dict[Ref, Found], message: str) -> None:
    spec = vm_spec({"instanceType": {"name": "small"}})
    resolution = resolve(wanted(spec), current, T0)
    assert resolution.spec is None
    assert resolution.error is not None
    assert message in resolution.error


def test_an_unknown_cluster_type_says_cluster_wide() -> None:
    spec = vm_spec({"instanceType": {"name": "u9.huge", "kind": "QemuClusterInstanceType"}})
    resolution = resolve(wanted(spec), {}, T0)
    assert resolution.error == "spec.instanceType: QemuClusterInstanceType 'u9.huge' not found cluster-wide"


# ---- Revisions ------------------------------------------------------------------------------------

TYPED = {"instanceType": {"name": "small"}}
OLD, NEW = {"cpus": 1, "memory": 128}, {"cpus": 1, "memory": 256}


@pytest.mark.parametrize(
    ("changes", "memory", "outdated"),
    [
        # First applied: the current content is taken.
        ({}, 256, False),
        # Taken for this generation, no rollout since: kept, and outdated.
        ({"frozen_type": frozen(SMALL, OLD)}, 128, True),
        # A rollout asked before the revision was taken changes nothing.
        ({"frozen_type": frozen(SMALL, OLD), "rollout_requested_at": T0 - timedelta(seconds=1)}, 128, True),
        # A rollout asked after: the new revision.
        ({"frozen_type": frozen(SMALL, OLD), "rollout_requested_at": T0 + timedelta(seconds=1)}, 256, False),
        # A spec change (a new generation) takes the new revision too.
        ({"frozen_type": frozen(SMALL, OLD), "generation": 2}, 256, False),
        # A revision of another type (the reference changed) is not kept.
        ({"frozen_type": frozen(Ref("QemuInstanceType", "other"), OLD)}, 256, False),
    ],
)
def test_when_a_revision_is_kept_or_taken(changes: dict[str, Any], memory: int, outdated: bool) -> None:
    resolution = resolve(wanted(vm_spec(TYPED), **changes), {SMALL: Found(NEW)}, T0 + timedelta(minutes=1))
    assert resolution.spec is not None
    assert resolution.spec.memory == memory
    assert bool(resolution.outdated) is outdated
    assert resolution.instance_type is not None
    assert resolution.instance_type.revision == revision_of({"cpus": 1, "memory": memory})


def test_a_deleted_type_keeps_the_vm_running_its_revision_until_its_spec_changes() -> None:
    kept = resolve(wanted(vm_spec(TYPED), frozen_type=frozen(SMALL, OLD)), {}, T0)
    assert kept.spec is not None
    assert kept.spec.memory == 128
    assert "no longer exists" in kept.outdated[0]
    changed = resolve(wanted(vm_spec(TYPED), frozen_type=frozen(SMALL, OLD), generation=2), {}, T0)
    assert changed.spec is None
    assert changed.instance_type == frozen(SMALL, OLD), "the revision that runs stays in status"


def test_the_outdated_condition_moves_its_time_only_when_it_flips() -> None:
    spec = vm_spec(TYPED)
    outdated = resolve(wanted(spec, frozen_type=frozen(SMALL, OLD)), {SMALL: Found(NEW)}, T0)
    first = stamp(QemuVMStatus(), QemuVMStatus(), outdated, references=True, now=T0)
    [condition] = [c for c in first.conditions if c.type == "InstanceTypeOutdated"]
    assert (condition.status.value, condition.reason) == ("True", "NewRevisionAvailable")
    again = stamp(QemuVMStatus(), first, outdated, references=True, now=T0 + timedelta(minutes=5))
    assert again.conditions == first.conditions
    assert again.instance_type == frozen(SMALL, OLD)
    cleared = stamp(QemuVMStatus(), again, None, references=False, now=T0)
    assert cleared.instance_type is None
    assert not cleared.conditions


# ---- Cluster-wide types ----------------------------------------------------------------------------


def test_the_common_set_is_shipped_and_a_config_table_adds_or_replaces() -> None:
    assert ProcessSettings().instance_types == COMMON_INSTANCE_TYPES
    assert COMMON_INSTANCE_TYPES == {
        "u1.small": {"cpus": 1, "memory": 512},
        "u1.medium": {"cpus": 1, "memory": 1024},
        "u1.large": {"cpus": 2, "memory": 2048},
    }
    settings = ProcessSettings.model_validate(
        {"instance_types": {"u1.small": {"cpus": 1, "memory": "256Mi"}, "big": {"cpus": 8, "memory": "8Gi"}}}
    )
    assert settings.instance_types["u1.small"] == {"cpus": 1, "memory": 256}
    assert settings.instance_types["big"] == {"cpus": 8, "memory": 8192}
    assert ProcessSettings().preferences == {}


def test_a_bad_cluster_type_is_a_settings_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"QemuClusterInstanceType 'big': memory: Field required"):
        cluster_types("QemuClusterInstanceType", {"big": {"cpus": 8}})
    with pytest.raises(ValueError, match="at most 256"):
        cluster_types("QemuClusterPreference", {f"p{i}": {} for i in range(257)})


def test_events_say_when_a_revision_is_taken_and_when_a_newer_one_waits() -> None:
    spec = vm_spec(TYPED)
    first = stamp(
        QemuVMStatus(),
        QemuVMStatus(),
        resolve(wanted(spec), {SMALL: Found(OLD)}, T0),
        references=True,
        now=T0,
    )
    assert [(e.reason, e.message) for e in revision_events(QemuVMStatus(), first)] == [
        ("RevisionTaken", f"QemuInstanceType 'small' revision {revision_of(OLD)} (cpus 1, memory 128)")
    ]
    kept = resolve(wanted(spec, frozen_type=first.instance_type), {SMALL: Found(NEW)}, T0)
    outdated = stamp(QemuVMStatus(), first, kept, references=True, now=T0)
    [event] = revision_events(first, outdated)
    assert event.reason == "InstanceTypeOutdated"
    assert f"runs {revision_of(OLD)}, current is {revision_of(NEW)}" in event.message
    assert revision_events(outdated, outdated) == [], "nothing new, no event"


def test_the_incremental_state_reader_finds_types_as_extract_vms_does() -> None:
    """Both readers of a state write (api/state_reader.py and api/tfstate.py) sort what they
    find the same way: a type is never taken for a VM."""
    document = state(
        manifest("QemuInstanceType", "small", {"cpus": 1, "memory": 64}),
        manifest("QemuVM", "vm", {"boot": BOOT, "instanceType": {"name": "small"}}),
    )
    body = json.dumps(document).encode()
    _, incremental = read_state(body)
    assert incremental is not None
    assert incremental.types == extract_vms(document, cache=False).types
    assert [vm.name for vm in incremental.vms] == ["vm"]


def test_tables_and_describe_show_the_size_a_vm_takes_from_its_type() -> None:
    spec = vm_spec({**TYPED, "preference": {"name": "linux"}})
    status = stamp(
        QemuVMStatus(),
        QemuVMStatus(),
        resolve(wanted(spec), {SMALL: Found(NEW), LINUX: Found({"machine": "microvm"})}, T0),
        references=True,
        now=T0,
    )
    metadata = {
        "name": "vm",
        "project": "lab",
        "uid": "u",
        "generation": 1,
        "creationTimestamp": T0.isoformat(),
    }
    vm = {"metadata": metadata, "spec": spec, "status": status.model_dump(mode="json", by_alias=True)}
    columns = {column.header: column.cell(vm, T0) for column in VM_TABLE_COLUMNS}
    assert (columns["CPUS"], columns["MEMORY"]) == ("1", "256Mi")
    described = describe_vm(vm, [], T0)
    assert re.search(r"InstanceType:\s+small \(QemuInstanceType\)", described)
    assert re.search(r"Preference:\s+linux \(QemuPreference\)", described)
    assert re.search(r"Memory:\s+256 MiB", described)
    assert re.search(r"Machine:\s+microvm", described)
    assert re.search(r"Run Strategy:\s+Always", described), "the spec's defaults where nothing sets them"


def test_the_documented_limits_of_a_type_manifest() -> None:
    """256 KiB as JSON, 16 levels deep, names of at most 63 characters, 16-digit revisions."""
    big = manifest("QemuPreference", "big", {"cloudInit": {"userData": "x" * (256 * 1024)}})
    [refused] = extract_vms(state(big)).types
    assert refused.error == "manifest: larger than 262144 bytes or nested too deep"
    deep: dict[str, Any] = {}
    for _ in range(16):
        deep = {"a": deep}
    [nested] = extract_vms(state(manifest("QemuPreference", "deep", {"cloudInit": {"metaData": deep}}))).types
    assert nested.error == "manifest: larger than 262144 bytes or nested too deep"
    assert extract_vms(state(manifest("QemuInstanceType", "a" * 63, {"cpus": 1, "memory": 64}))).types
    [too_long] = extract_vms(
        state(manifest("QemuInstanceType", "a" * 64, {"cpus": 1, "memory": 64}))
    ).problems
    assert "at most 63" in too_long.message
    assert len(revision_of({"cpus": 1, "memory": 64})) == 16


def test_cluster_types_from_the_config_file_and_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "tofu-qemu.toml"
    config.write_text(
        '[instance_types."u1.small"]\ncpus = 1\nmemory = "256Mi"\n\n'
        '[preferences.linux]\nstopTimeout = "1m"\n',
        encoding="utf-8",
    )
    settings = load_settings(ServeSettings, flags={}, env={}, config_file=config)
    assert settings.instance_types["u1.small"] == {"cpus": 1, "memory": 256}
    assert settings.instance_types["u1.large"] == {"cpus": 2, "memory": 2048}, (
        "the rest of the shipped set stays"
    )
    assert settings.preferences == {"linux": {"stopTimeout": 60}}
    env = {"TOFU_QEMU_INSTANCE_TYPES": '{"big": {"cpus": 8, "memory": "8Gi"}}'}
    assert load_settings(ServeSettings, flags={}, env=env).instance_types["big"] == {
        "cpus": 8,
        "memory": 8192,
    }
    with pytest.raises(SettingsError, match="must be a JSON object"):
        load_settings(ServeSettings, flags={}, env={"TOFU_QEMU_PREFERENCES": "linux"})
