"""State parsing and QemuVM extraction over real Terraform state shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.state_reader import read_state
from api.testing.tfstate import encode, instance, manifest, resource, state
from api.tfstate import Extraction, StateFormatError, extract_vms, parse_state
from tests.fixtures import generate


def fixture(name: str) -> bytes:
    return (generate.FIXTURES / name).read_bytes()


# The VMs of the lab (tests/fixtures/tfstate/lab) by name, with the address Terraform gave each.
LAB_VMS = {
    "single": "terraform_data.single",
    "api": 'terraform_data.vm["api"]',
    "web": 'terraform_data.vm["web"]',
    "worker-0": "terraform_data.worker[0]",
    "worker-1": "terraform_data.worker[1]",
    "too-small": "terraform_data.too_small",
    "db": "module.db.terraform_data.this",
    "pool-a-0": 'module.pool["a"].module.member[0].terraform_data.this',
    "pool-b-0": 'module.pool["b"].module.member[0].terraform_data.this',
}


def test_real_terraform_state_parses() -> None:
    """A state written by Terraform 1.11 yields its serial, lineage and every declared VM: root,
    count, for_each, a module and a module nested in a for_each module; the plain input is not one."""
    summary = parse_state(fixture(generate.UPDATED))
    assert (summary.serial, summary.lineage, summary.is_encrypted) == (13, generate.LINEAGE, False)
    vms = {vm.name: vm for vm in extract_vms(summary.document).vms}
    assert {name: vm.address for name, vm in vms.items()} == LAB_VMS
    assert vms["too-small"].error == "spec.memory: must be ≥ 16 MiB"
    assert [name for name, vm in vms.items() if vm.error is not None] == ["too-small"]
    assert vms["web"].spec["memory"] == 4096
    assert vms["single"].labels == {"tier": "db"}


def test_real_tainted_instance_is_still_declared() -> None:
    """`terraform taint` marks the instance; it exists until the next apply replaces it."""
    summary = parse_state(fixture(generate.TAINTED))
    assert {vm.name for vm in extract_vms(summary.document).vms} == set(LAB_VMS)
    assert '"status": "tainted"' in fixture(generate.TAINTED).decode()


def test_real_state_after_destroy_declares_nothing() -> None:
    """Destroy leaves a state with no resources (and check results left `unknown`)."""
    summary = parse_state(fixture(generate.DESTROYED))
    assert summary.lineage == generate.LINEAGE
    assert extract_vms(summary.document) == Extraction(vms=(), problems=())


def test_encrypted_envelope_is_recognised() -> None:
    """OpenTofu's encrypted envelope is detected by encryption_version and keeps serial/lineage."""
    summary = parse_state(fixture(generate.ENCRYPTED))
    assert (summary.encryption_version, summary.serial, summary.lineage) == ("v0", 13, generate.LINEAGE)


def test_encrypted_fixture_holds_the_real_state() -> None:
    """The envelope decrypts, as OpenTofu would with the documented passphrase, to the very bytes of
    the Terraform state it was built from: it is a real envelope, not a look-alike."""
    assert generate.open_envelope(fixture(generate.ENCRYPTED)) == fixture(generate.ENCRYPTED_FROM)
    assert generate.seal(fixture(generate.ENCRYPTED_FROM)) == fixture(generate.ENCRYPTED)


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


@pytest.mark.parametrize(
    "odd",
    [
        {"resources": [{"mode": "managed", "type": "terraform_data", "name": "a", "instances": True}]},
        {"resources": [{"mode": "managed", "type": "terraform_data", "name": "a", "instances": "xy"}]},
        {"resources": [{"mode": "managed", "type": "terraform_data", "name": "a", "instances": {"k": 1}}]},
    ],
)
def test_resources_or_instances_of_another_shape_declare_nothing(odd: dict[str, Any]) -> None:
    """A resource whose `instances` is not a list is stored, and declares no VM: it once failed
    the write with a TypeError (found by test_fuzz_models), both through the strict parser and
    through the incremental reader that serves real writes. (`resources` of another shape is a
    400, see test_malformed_states_are_refused.)"""
    body = json.dumps({"version": 4, "serial": 1, "lineage": "l", **odd}).encode()
    assert extract_vms(parse_state(body).document) == Extraction(vms=(), problems=())
    summary, extraction = read_state(body)
    assert summary.serial == 1
    assert extraction is None or extraction == Extraction(vms=(), problems=())
