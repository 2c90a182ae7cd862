"""Hostile manifests and states, end to end: state bytes → extraction → spec → QEMU argv.

Every free-text field either is refused with a `Valid=False` message naming it, or reaches the
argv without adding an option or a `key=value` pair. Assertions are made on the final argv,
parsed back the way QEMU reads it. Other tables cover the rest: test_types.py (memory 0, -1,
10**30, floats), test_argv.py (a hostile data dir), test_names.py (project names).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path, PurePath
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from pydantic import ValidationError

from api import tfstate
from api.spec_fields import describe_validation_error
from api.testing.tfstate import encode, instance, manifest, resource, state
from api.tfstate import DeclaredVM, ExtractionProblem, StateFormatError, extract_vms, parse_state
from api.types import QemuVMSpec
from controller.qemu.argv import build_argv
from tests.unit.test_fuzz_models import DATA_DIR, HOSTILE_CHARS, fuzz_settings, launch_inputs

# Options build_argv writes without a value; every other option takes exactly one.
FLAGS = frozenset({"-nodefaults", "-no-user-config", "-S"})
# Options whose value QEMU parses as `key=value,...` (a bare first part is the implied key).
KEYED = frozenset({"-name", "-chardev", "-mon", "-blockdev", "-device", "-netdev"})


# ---- Reading an argv back the way QEMU does ---------------------------------------------------


def split_option_string(value: str) -> list[str]:
    """Split `key=value,...` as QEMU's option parser does: `,,` is a literal comma."""
    parts, current, index = [], "", 0
    while index < len(value):
        if value[index] == ",":
            if value.startswith(",,", index):
                current += ","
                index += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += value[index]
        index += 1
    return [*parts, current]


def argv_structure(argv: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """Each option in order, with the keys of its value: what no spec may change.

    Walking argv as QEMU does also proves that '-' starts an element only where an option is
    expected: a value that looked like an option would shift everything after it.
    """
    structure: list[tuple[str, tuple[str, ...]]] = []
    index = 1
    while index < len(argv):
        option = argv[index]
        assert option.startswith("-"), f"argv[{index}] = {option[:60]!r} is not an option"
        if option in FLAGS:
            structure.append((option, ()))
            index += 1
            continue
        value = argv[index + 1]
        keys: tuple[str, ...] = ()
        if option in KEYED:
            keys = tuple(part.partition("=")[0] for part in split_option_string(value))
        structure.append((option, keys))
        index += 2
    return structure


def benign_twin(spec: QemuVMSpec) -> QemuVMSpec:
    """The same shape of spec with every free-text field replaced by a plain word."""
    raw = spec.model_dump(mode="json", by_alias=True)
    if raw["boot"] is not None:
        raw["boot"] = {
            "kernel": "kernel",
            "initrd": None if raw["boot"]["initrd"] is None else "initrd",
            "cmdline": "quiet",
        }
    for index, disk in enumerate(raw["disks"]):
        disk["name"] = f"disk{index}"
        if disk["image"] is not None:
            disk["image"] = "image"
    return QemuVMSpec.model_validate(raw)


def declare(raw_manifest: dict[str, Any]) -> DeclaredVM | ExtractionProblem:
    """The one VM or problem that a state holding `raw_manifest` yields, via its bytes."""
    document = parse_state(encode(state(1, [resource("vm", [instance(raw_manifest)])]))).document
    extraction = extract_vms(document)
    (found,) = extraction.vms + extraction.problems
    return found


def argv_of(vm: DeclaredVM, *, data_dir: PurePath = DATA_DIR) -> tuple[str, ...]:
    """The argv the controller would build from the stored canonical spec."""
    assert vm.error is None, vm.error
    spec = QemuVMSpec.model_validate(vm.spec)
    return build_argv(spec, launch_inputs(spec, vm.name, data_dir=data_dir))


def assert_argv_is_safe(vm: DeclaredVM, *, data_dir: PurePath = DATA_DIR) -> tuple[str, ...]:
    """Same options and keys as a benign spec of the same shape; paths stay in the images dir."""
    argv = argv_of(vm, data_dir=data_dir)
    spec = QemuVMSpec.model_validate(vm.spec)
    twin = benign_twin(spec)
    expected = argv_structure(build_argv(twin, launch_inputs(twin, "vm", data_dir=data_dir)))
    assert argv_structure(argv) == expected
    assert not any(ord(ch) < 0x20 or ord(ch) == 0x7F for arg in argv for ch in arg)
    # Both sides normalised: the operator's data dir may itself hold `..` segments.
    images_dir = os.path.normpath(data_dir / "images") + "/"
    for option in ("-kernel", "-initrd"):
        if option in argv:
            assert os.path.normpath(argv[argv.index(option) + 1]).startswith(images_dir)
    if spec.boot is not None:
        expected_cmdline = f"console=ttyS0 tofu.name={vm.name}"
        if spec.boot.cmdline:
            expected_cmdline += f" {spec.boot.cmdline}"
        assert argv[argv.index("-append") + 1] == expected_cmdline
    return argv


# ---- Every free-text field × every hostile value ----------------------------------------------

HOSTILE_VALUES = {
    "comma": "a,b",
    "comma-key": "a,id=evil",
    "doubled-comma": "a,,b",
    "equals": "a=b",
    "newline": "a\nb",
    "semicolon": "a;rm -rf x",
    "space": "a b",
    "leading-dash": "-hda",
    "nul": "a\x00b",
    "unicode": "wéb",
    "very-long": "x" * 5000,
}


def with_name(value: str) -> dict[str, Any]:
    return manifest(value)


def with_label_key(value: str) -> dict[str, Any]:
    return manifest("vm", labels={value: "x"})


def with_label_value(value: str) -> dict[str, Any]:
    return manifest("vm", labels={"tier": value})


def with_kernel(value: str) -> dict[str, Any]:
    return manifest("vm", boot={"kernel": value})


def with_initrd(value: str) -> dict[str, Any]:
    return manifest("vm", boot={"kernel": "kernel", "initrd": value})


def with_cmdline(value: str) -> dict[str, Any]:
    return manifest("vm", boot={"kernel": "kernel", "cmdline": value})


def with_disk_name(value: str) -> dict[str, Any]:
    return manifest("vm", disks=[{"name": value, "size": 64}])


def with_disk_image(value: str) -> dict[str, Any]:
    return manifest("vm", disks=[{"name": "root", "image": value}])


# Field id → (where the Valid=False message must point, how to put a value there).
FIELDS = {
    "name": ("metadata.name", with_name),
    "label-key": ("metadata.labels", with_label_key),
    "label-value": ("metadata.labels", with_label_value),
    "kernel": ("spec.boot.kernel", with_kernel),
    "initrd": ("spec.boot.initrd", with_initrd),
    "cmdline": ("spec.boot.cmdline", with_cmdline),
    "disk-name": ("spec.disks[0].name", with_disk_name),
    "disk-image": ("spec.disks[0].image", with_disk_image),
}
# The kernel command line is free text by design: one -append argument, never parsed by QEMU.
CMDLINE_ACCEPTS = {"comma", "comma-key", "doubled-comma", "equals", "semicolon", "space", "leading-dash"}


@pytest.mark.parametrize("value_id", HOSTILE_VALUES)
@pytest.mark.parametrize("field", FIELDS)
def test_hostile_values_are_refused_or_harmless(field: str, value_id: str) -> None:
    """Each hostile value in each free-text field is refused naming the field, or changes no option."""
    location, build = FIELDS[field]
    found = declare(build(HOSTILE_VALUES[value_id]))
    if field == "cmdline" and value_id in CMDLINE_ACCEPTS:
        assert isinstance(found, DeclaredVM)
        assert_argv_is_safe(found)
        return
    message = found.message if isinstance(found, ExtractionProblem) else found.error
    assert message is not None, f"{field} accepted {value_id}"
    assert message.startswith(f"{location}: ")
    assert len(message) < 400, "the message quotes a bounded prefix of the value"


def test_leading_dash_cmdline_stays_inside_append() -> None:
    """A cmdline that is a QEMU option is text after the fixed prefix, not an option."""
    vm = declare(with_cmdline("-device virtio-9p-pci,fsdev=root -hda /etc/shadow"))
    assert isinstance(vm, DeclaredVM)
    argv = assert_argv_is_safe(vm)
    assert "-hda" not in argv
    assert argv.count("-device") == 1


def test_hostile_operator_data_dir_is_escaped_in_every_option() -> None:
    """A data dir with commas (operator-chosen, not validated) is doubled wherever QEMU parses it."""
    vm = declare(manifest("vm", disks=[{"name": "root", "image": "base.qcow2"}]))
    assert isinstance(vm, DeclaredVM)
    argv = assert_argv_is_safe(vm, data_dir=PurePath("/srv/a,file.locking=off,b=c"))
    assert any("a,,file.locking=off,,b=c" in arg for arg in argv if arg.startswith("driver=qcow2"))


# ---- Property: any string that survives validation is harmless in argv --------------------------

dns_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
image_paths = st.from_regex(
    r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,40}(/[A-Za-z0-9_][A-Za-z0-9_.+-]{0,40}){0,3}", fullmatch=True
)
# No lone surrogates: parse_state refuses them before extraction (test_bodies_json_accepts...).
any_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"]) | st.sampled_from(HOSTILE_CHARS), max_size=300
)
printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=2100)


def spliced(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Hostile text, or valid text with a hostile character spliced in."""
    return any_text | st.tuples(valid, st.sampled_from(HOSTILE_CHARS), valid).map("".join)


VALID_TEXT = {
    "name": dns_labels,
    "kernel": image_paths,
    "initrd": image_paths,
    "cmdline": printable,
    "disk-name": dns_labels,
    "disk-image": image_paths,
}


@st.composite
def argv_bound_fields(draw: st.DrawFn) -> dict[str, str]:
    """A value for every argv-bound field: valid-looking, except up to two hostile ones, so that
    both refusals and hostile values that pass validation are common."""
    hostile = draw(st.sets(st.sampled_from(sorted(VALID_TEXT)), max_size=2))
    return {field: draw(spliced(valid) if field in hostile else valid) for field, valid in VALID_TEXT.items()}


@fuzz_settings()
@given(
    fields=argv_bound_fields(),
    with_initrd=st.booleans(),
    disk_count=st.integers(min_value=0, max_value=2),
    data_dir=st.text(alphabet=st.characters(min_codepoint=0x20, exclude_categories=["Cs"]), max_size=60),
)
def test_no_string_that_survives_validation_adds_an_option(
    fields: dict[str, str], with_initrd: bool, disk_count: int, data_dir: str
) -> None:
    """Free text in every argv-bound field: refused with a field-naming message, or inert in argv."""
    boot: dict[str, Any] = {"kernel": fields["kernel"], "cmdline": fields["cmdline"]}
    if with_initrd:
        boot["initrd"] = fields["initrd"]
    # Suffixes keep disk names unique without making them any less hostile.
    disks = [
        {"name": fields["disk-name"] + "-" * i + str(i), "image": fields["disk-image"]}
        for i in range(disk_count)
    ]
    found = declare(manifest(fields["name"], boot=boot, disks=disks))
    if isinstance(found, ExtractionProblem):
        event("refused: no usable name")
        assert found.message.startswith("metadata.name")
        return
    if found.error is not None:
        event("refused: Valid=False")
        assert found.error.startswith(("spec", "metadata"))
        return
    event("accepted: argv checked")
    assert_argv_is_safe(found, data_dir=PurePath("/" + data_dir.replace("\x7f", "")))


# ---- Path traversal ---------------------------------------------------------------------------

TRAVERSALS = [
    "../etc/passwd",
    "..",
    ".",
    "tiny/../../etc/shadow",
    "/etc/passwd",
    "//etc/passwd",
    "./vmlinuz",
    "tiny/./vmlinuz",
    "tiny//vmlinuz",
    "tiny/",
    ".hidden",
    "~root/vmlinuz",
    "..\\..\\etc\\passwd",
    "%2e%2e/etc/passwd",
    "tiny/..",
]


@pytest.mark.parametrize("path", TRAVERSALS)
@pytest.mark.parametrize("field", ["kernel", "initrd", "disk-image"])
def test_paths_that_could_leave_the_images_dir_are_refused(field: str, path: str) -> None:
    """`..`, absolute paths, empty or dot segments and escapes are not image names."""
    location, build = FIELDS[field]
    found = declare(build(path))
    assert isinstance(found, DeclaredVM)
    assert found.error is not None
    assert found.error.startswith(f"{location}: ")
    assert "must be a file name inside the images dir" in found.error


def test_label_key_with_an_empty_prefix_is_refused() -> None:
    """ "/tier" has an empty prefix, which Kubernetes refuses; "example.com/tier" is fine."""
    refused = declare(manifest("vm", labels={"/tier": "web"}))
    accepted = declare(manifest("vm", labels={"example.com/tier": "web"}))
    assert isinstance(refused, DeclaredVM)
    assert isinstance(accepted, DeclaredVM)
    assert (refused.error or "").startswith("metadata.labels: label key '/tier': the prefix")
    assert accepted.error is None


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/x", "x/..", "a..b", ".x"])
def test_disk_names_cannot_be_paths(name: str) -> None:
    """Disk names become file names under the VM's disk dir: only DNS labels are accepted."""
    found = declare(with_disk_name(name))
    assert isinstance(found, DeclaredVM)
    assert found.error is not None
    assert found.error.startswith("spec.disks[0].name: ")


def test_kernel_or_initrd_linked_outside_the_images_dir_is_not_used(tmp_path: Path) -> None:
    """An initrd that is a symlink out of the images dir is reported, never launched."""
    from controller.observe import _missing_images

    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinuz").write_bytes(b"kernel")
    secret = tmp_path / "shadow"
    secret.write_bytes(b"host secret")
    (images / "initrd").symlink_to(secret)
    spec = QemuVMSpec.model_validate({"boot": {"kernel": "vmlinuz", "initrd": "initrd"}})
    assert "initrd" in _missing_images(spec, images)


def test_kernel_linked_inside_the_images_dir_is_fine(tmp_path: Path) -> None:
    """A versioned kernel behind a symlink in the images dir is an ordinary image."""
    from controller.observe import _missing_images

    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinuz-6.1").write_bytes(b"kernel")
    (images / "vmlinuz").symlink_to("vmlinuz-6.1")
    spec = QemuVMSpec.model_validate({"boot": {"kernel": "vmlinuz"}})
    assert _missing_images(spec, images) == ()


# ---- Huge and odd numbers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param(
            {"memory": "abc"},
            "spec.memory: 'abc' is not a quantity: write e.g. 512, \"512Mi\"",
            id="memory-word",
        ),
        pytest.param({"memory": ""}, "spec.memory: '' is not a quantity", id="memory-empty"),
        pytest.param(
            {"memory": "-512Mi"}, "spec.memory: '-512Mi' is not a quantity", id="memory-negative-quantity"
        ),
        pytest.param({"memory": "0x200"}, "spec.memory: '0x200' is not a quantity", id="memory-hex"),
        pytest.param({"memory": "١٢٨"}, "spec.memory: '١٢٨' is not a quantity", id="memory-arabic-digits"),
        pytest.param({"memory": "1e3"}, "spec.memory: '1e3' is not a quantity", id="memory-exponent"),
        pytest.param({"memory": 1e3}, "spec.memory: must be an integer of MiB", id="memory-float-whole"),
        pytest.param({"memory": []}, "spec.memory: must be an integer of MiB", id="memory-list"),
        pytest.param({"memory": {"value": 1}}, "spec.memory: must be an integer of MiB", id="memory-object"),
        pytest.param({"memory": True}, "spec.memory: must be an integer of MiB", id="memory-bool"),
        pytest.param(
            {"memory": "999999999999999Ti"}, "spec.memory: must be ≤ 1048576 MiB", id="memory-huge-quantity"
        ),
        pytest.param({"memory": 10**4000}, "spec.memory: must be ≤ 1048576 MiB", id="memory-4000-digits"),
        pytest.param({"cpus": 10**30}, "spec.cpus: must be ≤ 64", id="cpus-huge"),
        pytest.param({"cpus": -1}, "spec.cpus: must be ≥ 1", id="cpus-negative"),
        pytest.param({"cpus": 2.0}, "spec.cpus: Input should be a valid integer", id="cpus-float"),
        pytest.param({"stopTimeout": -1}, "spec.stopTimeout: must be ≥ 0 s", id="timeout-negative"),
        pytest.param({"stopTimeout": 10**30}, "spec.stopTimeout: must be ≤ 3600 s", id="timeout-huge"),
        pytest.param(
            {"stopTimeout": "١٢٣"}, "spec.stopTimeout: '١٢٣' is not a duration", id="timeout-arabic-digits"
        ),
        pytest.param(
            {"stopTimeout": "²"}, "spec.stopTimeout: '²' is not a duration", id="timeout-superscript"
        ),
        pytest.param(
            {"stopTimeout": "1.5m"}, "spec.stopTimeout: '1.5m' is not a duration", id="timeout-fraction"
        ),
        pytest.param(
            {"disks": [{"name": "d", "size": 0}]}, "spec.disks[0].size: must be ≥ 1 MiB", id="disk-zero"
        ),
        pytest.param(
            {"disks": [{"name": "d", "size": -5}]}, "spec.disks[0].size: must be ≥ 1 MiB", id="disk-negative"
        ),
        pytest.param(
            {"disks": [{"name": "d", "size": 10**30}]}, "spec.disks[0].size: must be ≤", id="disk-huge"
        ),
        pytest.param(
            {"network": {"forwards": [{"guestPort": 0}]}},
            "spec.network.forwards[0].guestPort: must be ≥ 1",
            id="port-zero",
        ),
        pytest.param(
            {"network": {"forwards": [{"guestPort": 65536}]}},
            "spec.network.forwards[0].guestPort: must be ≤ 65535",
            id="port-too-big",
        ),
        pytest.param(
            {"network": {"forwards": [{"guestPort": 80.0}]}},
            "spec.network.forwards[0].guestPort: Input should be a valid integer",
            id="port-float",
        ),
    ],
)
def test_odd_numbers_are_a_clear_error(spec: dict[str, Any], message: str) -> None:
    """Wrong types, signs, scripts and magnitudes become one Valid=False message naming the field."""
    found = declare(manifest("vm", **spec))
    assert isinstance(found, DeclaredVM)
    assert found.error is not None
    assert found.error.startswith(message)


def test_null_means_default() -> None:
    """null is "use the default" (HCL optional attributes), not zero."""
    found = declare(manifest("vm", memory=None, cpus=None, stopTimeout=None))
    assert isinstance(found, DeclaredVM)
    assert found.error is None
    assert (found.spec["memory"], found.spec["cpus"], found.spec["stopTimeout"]) == (512, 1, 30)


@pytest.mark.parametrize(
    "name", ["wéb", "ｗｅｂ", "web\u200b", "ⅰ", "web\u0301", "WEB", "web_01", "x" * 64, ""]
)
def test_odd_vm_names_are_project_problems(name: str) -> None:
    """Unicode look-alikes, invisible characters, case and length: no object, a problem naming it."""
    found = declare(manifest(name))
    assert isinstance(found, ExtractionProblem)
    assert found.message.startswith("metadata.name: ")


# ---- Bodies the JSON parser lets through ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"[" * 100_000, "nested too deeply", id="deep-array"),
        pytest.param(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply", id="deep-object"),
        pytest.param(
            b'{"version":4,"serial":1,"lineage":"x","n":' + b"9" * 5000 + b"}",
            "a number with more than",
            id="5000-digit-number",
        ),
        pytest.param(
            b'{"version":4,"serial":1,"lineage":"x\\ud800"}', "not valid Unicode", id="lone-surrogate"
        ),
        pytest.param(
            b'{"version":4,"serial":1,"lineage":"x","o":{"\\udfff":1}}',
            "not valid Unicode",
            id="surrogate-key",
        ),
        pytest.param(
            b'{"version":4,"serial":1,"lineage":"\xed\xa0\x80"}', "not valid JSON", id="surrogate-bytes"
        ),
        pytest.param(
            b'{"version":4,"serial":9223372036854775808,"lineage":"x"}',
            "'serial' must be at most",
            id="serial-2^63",
        ),
        pytest.param(
            b'{"version":4,"serial":1,"lineage":"x","encryption_version":[[[1]]]}',
            "'encryption_version' must be a string",
            id="encryption-version-list",
        ),
    ],
)
def test_bodies_json_accepts_but_no_store_can_hold_are_refused(body: bytes, message: str) -> None:
    """Depth, digit and Unicode limits, and integers SQLite cannot hold, are a 400, not a crash."""
    with pytest.raises(StateFormatError, match=message):
        parse_state(body)


def test_valid_surrogate_pairs_are_fine() -> None:
    """An escaped emoji (a surrogate pair, as ensure_ascii writers emit) is ordinary text."""
    summary = parse_state(b'{"version":4,"serial":1,"lineage":"\\ud83d\\ude00"}')
    assert summary.lineage == "\U0001f600"


def test_largest_serial_sqlite_holds_is_accepted() -> None:
    """2**63 - 1 is a valid serial; the limit is SQLite's, not an arbitrary one."""
    assert parse_state(b'{"version":4,"serial":9223372036854775807,"lineage":"x"}').serial == 2**63 - 1


def bare_instance(raw: dict[str, Any]) -> dict[str, Any]:
    """builders.instance without its deep copy, which would itself recurse too deep here."""
    return {"schema_version": 0, "attributes": {"input": {"value": raw, "type": "dynamic"}}}


def test_deeply_nested_manifest_is_an_invalid_vm() -> None:
    """A manifest nested past any real one is refused as a VM error, before anything recurses into it."""
    deep: Any = 1
    for _ in range(600):
        deep = [deep]
    body = json.dumps(state(1, [resource("vm", [bare_instance(manifest("vm", boot={"kernel": deep}))])]))
    (vm,) = extract_vms(parse_state(body.encode()).document).vms
    assert vm.error is not None
    assert vm.error.startswith("manifest: nested more than")


def test_deeply_nested_manifest_without_name_is_a_problem() -> None:
    """Without a usable name, the too-deep manifest is reported on the project."""
    deep: Any = 1
    for _ in range(600):
        deep = {"a": deep}
    raw = manifest("vm")
    raw["metadata"] = {"name": deep}
    body = json.dumps(state(1, [resource("vm", [bare_instance(raw)])]))
    extraction = extract_vms(parse_state(body.encode()).document)
    (problem,) = extraction.problems
    assert "nested more than" in problem.message


def test_huge_manifest_is_an_invalid_vm_with_a_short_message() -> None:
    """A manifest far larger than any valid one is refused without validating its contents."""
    vm = declare(manifest("vm", boot={"kernel": "k", "cmdline": "x" * 200_000}))
    assert isinstance(vm, DeclaredVM)
    assert vm.error is not None
    assert vm.error.startswith("manifest: ")
    assert "larger than" in vm.error
    assert vm.spec == {}


def test_thousands_of_invalid_items_give_one_short_message() -> None:
    """30,000 bad disks are one error about the count, not 30,000 messages (memory stays bounded)."""
    started = time.monotonic()
    vm = declare(manifest("vm", disks=[1] * 30_000))
    assert isinstance(vm, DeclaredVM)
    assert vm.error == "spec.disks: at most 16 disks allowed, not 30000"
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        pytest.param(
            "network",
            {"forwards": [{"guestPort": 1}] * 40},
            "spec.network.forwards: at most 32",
            id="forwards",
        ),
        pytest.param(
            "labels", {f"k{i}": i for i in range(5000)}, "metadata.labels: at most 64 labels", id="labels"
        ),
    ],
)
def test_over_long_collections_are_refused_before_their_items(field: str, value: Any, message: str) -> None:
    """A collection past its limit is one clear error, whatever its items hold."""
    raw = manifest("vm", labels=value) if field == "labels" else manifest("vm", **{field: value})
    vm = declare(raw)
    assert isinstance(vm, DeclaredVM)
    assert vm.error is not None
    assert vm.error.startswith(message)


def test_many_errors_are_summarised() -> None:
    """Past a handful of errors the message counts the rest instead of listing them."""
    spec = {"boot": {"kernel": "k"}, **{f"unknown{i}": 1 for i in range(200)}}
    with pytest.raises(ValidationError) as caught:
        QemuVMSpec.model_validate(spec)
    message = describe_validation_error(caught.value, prefix="spec")
    assert message.count("Extra inputs are not permitted") == 10
    assert message.endswith("; and 190 more errors")


def test_large_manifests_do_not_fill_the_validation_cache() -> None:
    """Only small manifests are remembered, so the cache's memory is bounded whatever is posted."""
    before = tfstate._declare_cached.cache_info().currsize
    declare(manifest("vm", boot={"kernel": "k", "cmdline": "y" * (tfstate.CACHED_MANIFEST_MAX_BYTES + 1)}))
    assert tfstate._declare_cached.cache_info().currsize == before


def test_odd_resource_names_and_index_keys_make_printable_addresses() -> None:
    """A resource name or index key that is not a string or number does not end up in the address."""
    document = state(1, [resource("vm", [instance(manifest("vm"), index_key=7)])])
    document["resources"][0]["name"] = ["a", {"b": "c" * 1000}]
    document["resources"][0]["instances"][0]["index_key"] = {"k": [1, 2]}
    (vm,) = extract_vms(parse_state(json.dumps(document).encode()).document).vms
    assert vm.address == "terraform_data.?[?]"
