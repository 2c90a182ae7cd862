"""State parsing and QemuVM extraction over real Terraform state shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from api.tfstate import StateFormatError, extract_vms, parse_state
from tests.builders import encode, instance, manifest, resource, state

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "tfstate"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_real_terraform_state_parses() -> None:
    """A state written by Terraform 1.11 yields its serial and lineage and no VMs (ad-hoc inputs)."""
    summary = parse_state(fixture("state-02-lab-update-serial2.json"))
    assert (summary.serial, summary.lineage, summary.is_encrypted) == (
        2,
        "293de8df-eeef-85bb-f180-15b975114385",
        False,
    )
    assert extract_vms(summary.document).vms == ()


def test_encrypted_envelope_is_recognised() -> None:
    """OpenTofu's encrypted envelope is detected by encryption_version and keeps serial/lineage."""
    summary = parse_state(fixture("SYNTHETIC-opentofu-encrypted-state-pbkdf2-aesgcm.json"))
    assert (summary.encryption_version, summary.serial) == ("v0", 2)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"not json", "not valid JSON", id="not-json"),
        pytest.param(b"\xff\xfe", "not valid JSON", id="binary"),
        pytest.param(b"[]", "must be a JSON object", id="array"),
        pytest.param(b'{"version": 3, "serial": 1, "lineage": "x"}', "version 3", id="old-version"),
        pytest.param(b'{"version": 5, "serial": 1, "lineage": "x"}', "version 5", id="future-version"),
        pytest.param(b'{"version": 4, "lineage": "x"}', "needs 'serial'", id="no-serial"),
        pytest.param(b'{"version": 4, "serial": -1, "lineage": "x"}', "non-negative", id="negative-serial"),
        pytest.param(b'{"version": 4, "serial": 1, "lineage": 7}', "lineage", id="lineage-number"),
        pytest.param(
            b'{"version": 4, "serial": 1, "lineage": "x", "resources": {}}', "list", id="resources-map"
        ),
    ],
)
def test_malformed_states_are_refused(body: bytes, message: str) -> None:
    """Bodies no client could have written are refused with a reason."""
    with pytest.raises(StateFormatError, match=message):
        parse_state(body)


def lab_state() -> dict[str, Any]:
    """The resource layout of the lab fixture (root, count, for_each, modules), with QemuVM inputs."""
    return state(
        3,
        [
            resource("single", [instance(manifest("single"))]),
            resource("counted", [instance(manifest(f"count-{i}"), index_key=i) for i in range(2)]),
            resource("each", [instance(manifest("api"), index_key="api")], module='module.pool["a"]'),
            resource("nested", [instance(manifest("deep"))], module="module.a.module.b[0]"),
            resource("plain", [instance({"not": "a vm"})]),
            resource("imported", [instance(None)]),
            resource("provider", [{"attributes": {"id": "x", **manifest("typed")}}], type_="qemu_vm"),
        ],
    )


def test_extraction_finds_every_declared_vm_with_its_address() -> None:
    """count, for_each, nested modules and the qemu_vm resource type are all found."""
    extraction = extract_vms(lab_state())
    assert {vm.name: vm.address for vm in extraction.vms} == {
        "single": "terraform_data.single",
        "count-0": "terraform_data.counted[0]",
        "count-1": "terraform_data.counted[1]",
        "api": 'module.pool["a"].terraform_data.each["api"]',
        "deep": "module.a.module.b[0].terraform_data.nested",
        "typed": "qemu_vm.provider",
    }
    assert all(vm.error is None for vm in extraction.vms)


def test_extraction_from_terraform_serialised_bytes() -> None:
    """Extraction works on the document as parsed from Terraform-formatted bytes."""
    summary = parse_state(encode(lab_state()))
    assert len(extract_vms(summary.document).vms) == 6


def test_deposed_instances_are_skipped_and_tainted_kept() -> None:
    """A deposed object is on its way out; a tainted one still exists."""
    document = state(
        1,
        [
            resource(
                "vm",
                [
                    instance(manifest("old"), deposed="00000001"),
                    instance(manifest("tainted"), status="tainted"),
                ],
            )
        ],
    )
    assert [vm.name for vm in extract_vms(document).vms] == ["tainted"]


def test_data_sources_are_ignored() -> None:
    """Only managed resources declare VMs."""
    data = resource("vm", [instance(manifest("ghost"))])
    data["mode"] = "data"
    assert extract_vms(state(1, [data])).vms == ()


def test_nulls_mean_defaults() -> None:
    """HCL optional attributes arrive as null and take the spec's defaults."""
    raw = manifest("web", cpus=None, network={"forwards": [{"guestPort": 80, "hostPort": None}]})
    (vm,) = extract_vms(state(1, [resource("vm", [instance(raw)])])).vms
    assert vm.error is None
    assert vm.spec["cpus"] == 1
    assert vm.spec["network"]["forwards"] == [{"protocol": "tcp", "guestPort": 80, "hostPort": None}]


def test_invalid_spec_becomes_an_error_not_an_exception() -> None:
    """An invalid spec keeps its raw input and says which field is wrong."""
    (vm,) = extract_vms(state(1, [resource("vm", [instance(manifest("web", memory=8))])])).vms
    assert vm.error == "spec.memory: must be ≥ 16 MiB"
    assert vm.spec["memory"] == 8


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        pytest.param({}, "needs a name", id="missing"),
        pytest.param({"name": 7}, "needs a name", id="number"),
        pytest.param({"name": "Web_01"}, "lowercase", id="invalid"),
    ],
)
def test_manifest_without_usable_name_is_a_project_problem(metadata: dict[str, Any], message: str) -> None:
    """Without a valid name there is no object to hold a condition, so the project reports it."""
    raw = manifest("x")
    raw["metadata"] = metadata
    extraction = extract_vms(state(1, [resource("vm", [instance(raw)])]))
    assert extraction.vms == ()
    (problem,) = extraction.problems
    assert problem.address == "terraform_data.vm"
    assert message in problem.message


def test_duplicate_names_mark_the_vm_with_a_conflict() -> None:
    """Two manifests with one name: the VM is invalid and the message lists both addresses."""
    document = state(
        1, [resource("a", [instance(manifest("web"))]), resource("b", [instance(manifest("web", cpus=2))])]
    )
    (vm,) = extract_vms(document).vms
    assert vm.error is not None
    assert "declared 2 times" in vm.error
    assert "terraform_data.a, terraform_data.b" in vm.error


def spec_hash_of(raw: dict[str, Any]) -> str:
    (vm,) = extract_vms(state(1, [resource("vm", [instance(raw)])])).vms
    return vm.spec_hash


@pytest.mark.parametrize(
    ("left", "right", "same"),
    [
        pytest.param(manifest("a", memory=512), manifest("a", memory="512Mi"), True, id="quantity-spelling"),
        pytest.param(manifest("a"), manifest("a", cpus=1), True, id="explicit-default"),
        pytest.param(
            manifest("a", stopTimeout="1m"), manifest("a", stopTimeout=60), True, id="duration-spelling"
        ),
        pytest.param(manifest("a", memory=512), manifest("a", memory=1024), False, id="memory-change"),
        pytest.param(manifest("a"), manifest("a", labels={"tier": "web"}), False, id="label-change"),
        pytest.param(manifest("a", memory=8), manifest("a", memory=9), False, id="invalid-input-change"),
    ],
)
def test_spec_hash_tracks_meaning_not_spelling(
    left: dict[str, Any], right: dict[str, Any], same: bool
) -> None:
    """The hash (and so generation) changes only when the desired VM changes."""
    assert (spec_hash_of(left) == spec_hash_of(right)) is same


def test_huge_numbers_in_state_do_not_crash() -> None:
    """Arbitrary-precision numbers, as Terraform writes them, become a clear error."""
    body = json.dumps(state(1, [resource("vm", [instance(manifest("a"))])])).replace(
        '"memory": 256', '"memory": 123456789012345678901234567890'
    )
    (vm,) = extract_vms(parse_state(body.encode()).document).vms
    assert vm.error is not None
    assert "spec.memory: must be ≤" in vm.error
