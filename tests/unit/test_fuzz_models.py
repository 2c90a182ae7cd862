"""Fuzzing the manifest models and the state extractor with hypothesis.

Properties, whatever the input: validation raises only ValidationError and its message names a
field; a spec that validates is canonical (validating its dump gives it back) and builds an
argv; parse_state raises only StateFormatError, and what it accepts the store can hold (a
64-bit serial, UTF-8 text); extract_vms never raises on a document that parse_state accepted,
and every VM it reports valid has a spec the controller can load.

The example count is bounded for CI; TOFU_QEMU_FUZZ_EXAMPLES raises it (docs/security.md).
"""

from __future__ import annotations

import json
import os
from pathlib import PurePath
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from api import names
from api.quantity import parse_mebibytes, parse_seconds
from api.spec_fields import describe_validation_error
from api.tfstate import StateFormatError, extract_vms, parse_state
from api.types import Accel, QemuVMManifest, QemuVMSpec
from controller.qemu.argv import LaunchInputs, RuntimePaths, build_argv

FUZZ_EXAMPLES_ENV = "TOFU_QEMU_FUZZ_EXAMPLES"
DEFAULT_FUZZ_EXAMPLES = 150
UID = "6f1c1d1e-4c5b-4d59-9f40-0d4b0a6c1e11"
DATA_DIR = PurePath("/var/lib/tofu-qemu")


def fuzz_settings(*, default_examples: int = DEFAULT_FUZZ_EXAMPLES) -> settings:
    """Bounded for CI; `TOFU_QEMU_FUZZ_EXAMPLES=5000` runs every fuzz test that much longer.

    No deadline: the first examples pay for imports and caches, and a slow example is not a
    bug here. Shared by the other fuzz modules so one variable governs them all.
    """
    examples = int(os.environ.get(FUZZ_EXAMPLES_ENV) or default_examples)
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# ---- Strategies ------------------------------------------------------------------------------

# Characters QEMU, shells, paths and JSON treat specially, mixed into otherwise arbitrary text.
HOSTILE_CHARS = ",=;\n\r\t\0 -./\\\"'$`|&<>*?~%{}[]:@#!é\u2028\ufeff"
# Text a state can carry: parse_state refuses lone surrogates, so they never reach extraction.
state_characters = st.characters(exclude_categories=["Cs"])
hostile_text = st.text(alphabet=state_characters | st.sampled_from(HOSTILE_CHARS), max_size=80)
json_text = st.text(alphabet=state_characters, max_size=40)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=20,
)


def field_or_junk(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values (so validation gets deep), sometimes any JSON value."""
    return st.one_of(plausible, plausible, json_values)


dns_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
image_paths = st.from_regex(
    r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,15}(/[A-Za-z0-9_][A-Za-z0-9_.+-]{0,15}){0,2}", fullmatch=True
)
quantities = st.integers(min_value=-10, max_value=10**7) | st.from_regex(
    r"[0-9]{1,6}(Ki|Mi|Gi|Ti|K|M|G|T)?", fullmatch=True
)
durations = st.integers(min_value=-5, max_value=5000) | st.from_regex(
    r"([0-9]{1,3}[hms]){1,3}", fullmatch=True
)
ports = st.integers(min_value=-1, max_value=70000)

boots = st.fixed_dictionaries(
    {"kernel": field_or_junk(image_paths | hostile_text)},
    optional={
        "initrd": field_or_junk(image_paths | hostile_text),
        "cmdline": field_or_junk(hostile_text | st.text(alphabet=st.characters(max_codepoint=126))),
    },
)
disks = st.fixed_dictionaries(
    {"name": field_or_junk(dns_labels | hostile_text)},
    optional={
        "image": field_or_junk(image_paths | hostile_text),
        "size": field_or_junk(quantities),
        "reclaimPolicy": field_or_junk(st.sampled_from(["Delete", "Retain"])),
    },
)
forwards = st.fixed_dictionaries(
    {"guestPort": field_or_junk(ports)},
    optional={
        "hostPort": field_or_junk(ports),
        "protocol": field_or_junk(st.sampled_from(["tcp", "udp"])),
    },
)
specs = st.fixed_dictionaries(
    {},
    optional={
        "cpus": field_or_junk(st.integers(min_value=-2, max_value=100)),
        "memory": field_or_junk(quantities),
        "machine": field_or_junk(st.sampled_from(["q35", "microvm"])),
        "accel": field_or_junk(st.sampled_from(["auto", "kvm", "tcg"])),
        "runStrategy": field_or_junk(st.sampled_from(["Always", "RerunOnFailure", "Halted"])),
        "boot": field_or_junk(boots),
        "disks": field_or_junk(st.lists(disks, max_size=4)),
        "network": field_or_junk(st.fixed_dictionaries({"forwards": st.lists(forwards, max_size=4)})),
        "stopTimeout": field_or_junk(durations),
    },
)
label_maps = st.dictionaries(dns_labels | hostile_text, dns_labels | hostile_text, max_size=3)
manifests = st.fixed_dictionaries(
    {
        "apiVersion": field_or_junk(st.just("tofu-qemu.dev/v1alpha1")),
        "kind": field_or_junk(st.just("QemuVM")),
        "metadata": field_or_junk(
            st.fixed_dictionaries(
                {"name": field_or_junk(dns_labels | hostile_text)}, optional={"labels": label_maps}
            )
        ),
        "spec": field_or_junk(specs),
    }
)


def wrapped(manifest: Any) -> dict[str, Any]:
    """An instance as Terraform stores it: `input` in the dynamic wrapper, or bare."""
    return {"schema_version": 0, "attributes": {"input": {"value": manifest, "type": "dynamic"}}}


instances = st.one_of(
    manifests.map(wrapped),
    st.fixed_dictionaries({"attributes": st.fixed_dictionaries({"input": json_values})}),
    st.fixed_dictionaries(
        {"attributes": manifests}, optional={"index_key": st.integers() | json_text, "deposed": json_text}
    ),
    json_values,
)
resources = st.one_of(
    st.fixed_dictionaries(
        {
            "mode": field_or_junk(st.just("managed")),
            "type": field_or_junk(st.sampled_from(["terraform_data", "qemu_vm"])),
            "name": field_or_junk(json_text),
            "instances": field_or_junk(st.lists(instances, max_size=4)),
        },
        optional={"module": field_or_junk(st.just('module.m["k"]'))},
    ),
    json_values,
)
states = st.fixed_dictionaries(
    {
        "version": field_or_junk(st.just(4)),
        "serial": field_or_junk(st.integers(min_value=0, max_value=2**64)),
        "lineage": field_or_junk(json_text),
        "resources": field_or_junk(st.lists(resources, max_size=5)),
    },
    optional={"encryption_version": json_values, "outputs": json_values},
)


# ---- Properties ------------------------------------------------------------------------------


def launch_inputs(spec: QemuVMSpec, name: str, *, data_dir: PurePath = DATA_DIR) -> LaunchInputs:
    """What the controller resolves before building argv (controller/plan.py _argv)."""
    return LaunchInputs(
        uid=UID,
        name=name,
        accel=Accel.TCG,
        runtime=RuntimePaths(data_dir / "run" / UID),
        images_dir=data_dir / "images",
        disk_paths={disk.name: data_dir / "disks" / UID / f"{disk.name}.qcow2" for disk in spec.disks},
        host_ports={(f.protocol, f.guest_port): 20000 + i for i, f in enumerate(spec.network.forwards)},
    )


@fuzz_settings()
@given(raw=field_or_junk(specs))
def test_spec_validation_is_total_and_canonical(raw: Any) -> None:
    """Any input either fails with a message naming a field, or gives a canonical, launchable spec."""
    try:
        spec = QemuVMSpec.model_validate(raw)
    except ValidationError as err:
        message = describe_validation_error(err, prefix="spec")
        assert message.startswith("spec")
        return
    dumped = spec.model_dump(mode="json", by_alias=True)
    assert QemuVMSpec.model_validate(dumped) == spec
    assert (
        QemuVMSpec.model_validate(json.loads(json.dumps(dumped))).model_dump(mode="json", by_alias=True)
        == dumped
    )
    assert build_argv(spec, launch_inputs(spec, "vm"))[0] == "qemu-system-x86_64"


@fuzz_settings()
@given(raw=manifests)
def test_manifest_validation_is_total(raw: dict[str, Any]) -> None:
    """Manifests validate or fail with ValidationError only; a valid one has a DNS-label name."""
    try:
        manifest = QemuVMManifest.model_validate(raw)
    except ValidationError as err:
        message = describe_validation_error(err)
        assert message, "a refusal says why"
        return
    assert names.dns_label_problem(manifest.metadata.name) is None
    for key, value in manifest.metadata.labels.items():
        assert names.label_key_problem(key) is None
        assert names.label_value_problem(value) is None


def state_body(middle: bytes, *, serial: bytes = b"1") -> bytes:
    return b'{"version":4,"serial":' + serial + b',"lineage":"x","outputs":' + middle + b"}"


# The shapes Python's json module does not refuse with JSONDecodeError: nesting past the
# recursion limit, integers past the digit limit, escapes of lone UTF-16 surrogates, and
# serials beyond SQLite's 64-bit integers.
odd_state_bodies = st.one_of(
    st.sampled_from([2, 500, 975, 990, 3000, 100_000]).map(lambda n: state_body(b"[" * n + b"]" * n)),
    st.sampled_from([1, 4300, 4301, 6000]).map(lambda n: state_body(b"9" * n)),
    st.integers(min_value=0xD800, max_value=0xDFFF).map(lambda c: state_body(b'"\\u%x"' % c)),
    st.integers(min_value=0, max_value=2**70).map(lambda n: state_body(b"{}", serial=str(n).encode())),
)


@fuzz_settings()
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()) | odd_state_bodies)
def test_parse_state_refuses_only_with_state_format_error(body: bytes) -> None:
    """Bytes are parsed or refused with StateFormatError, and what is accepted can be stored:
    a serial SQLite can hold, and only text that encodes as UTF-8."""
    try:
        summary = parse_state(body)
    except StateFormatError as err:
        message = str(err)
        assert message, "a refusal says why"
        return
    assert isinstance(summary.document, dict)
    assert summary.serial is None or summary.serial < 2**63
    for text in strings_in(summary.document):
        text.encode("utf-8")


def strings_in(document: object) -> list[str]:
    """Every key and string value, found without recursion (the document may be deep)."""
    found, pending = [], [document]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return found


@fuzz_settings()
@given(document=states)
def test_extraction_never_raises_and_valid_vms_load(document: dict[str, Any]) -> None:
    """Whatever a state holds, extraction reports VMs and problems; valid VMs load as specs."""
    try:
        summary = parse_state(json.dumps(document).encode())
    except StateFormatError:
        return
    if summary.is_encrypted:
        return
    extraction = extract_vms(summary.document)
    assert extract_vms(summary.document) == extraction
    seen = set()
    for vm in extraction.vms:
        assert names.dns_label_problem(vm.name) is None
        assert vm.name not in seen
        seen.add(vm.name)
        if vm.error is None:
            spec = QemuVMSpec.model_validate(vm.spec)
            assert spec.model_dump(mode="json", by_alias=True) == vm.spec
            build_argv(spec, launch_inputs(spec, vm.name))
        else:
            assert vm.error.strip()
    assert all(problem.message for problem in extraction.problems)


@fuzz_settings()
@given(value=json_values | hostile_text)
def test_quantities_raise_only_value_error(value: Any) -> None:
    """Sizes and durations either parse to an int or raise ValueError with a message."""
    for parse in (parse_mebibytes, parse_seconds):
        try:
            result = parse(value)
        except ValueError as err:
            message = str(err)
            assert message, "a refusal says why"
        else:
            assert isinstance(result, int)
            assert not isinstance(result, bool)
