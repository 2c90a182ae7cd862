"""The incremental state reader: the same answer as parse_state + extract_vms for every body,
hostile ones included, while instances met before are neither decoded nor validated again."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from api import json_body, state_reader, tfstate
from api.json_body import PIECEWISE_DECODE_BYTES, StateFormatError, decode_json
from api.state_reader import read_state
from api.testing.tfstate import encode, instance, manifest, resource, state, vm_state
from api.tfstate import Extraction, StateSummary, extract_vms, parse_state

HEAD = b'{"version":4,"serial":1,"lineage":"x",'


def usual(body: bytes) -> tuple[StateSummary, Extraction | None]:
    """What the backend computed before the incremental reader: the reference."""
    summary = parse_state(body)
    return summary, None if summary.is_encrypted else extract_vms(summary.document, cache=False)


def outcome(read: Callable[[bytes], tuple[StateSummary, Extraction | None]], body: bytes) -> Any:
    """What a reader makes of a body: the error's message, or the summary and extraction."""
    try:
        summary, extraction = read(body)
    except StateFormatError as err:
        return ("refused", str(err))
    return (summary.serial, summary.lineage, summary.encryption_version, extraction)


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    state_reader._CACHE.clear()
    yield
    state_reader._CACHE.clear()


HOSTILE_VALUES = {
    "lone-surrogate": b'"x\\ud800"',
    "surrogate-key": b'{"\\udfff":1}',
    "surrogate-bytes": b'"\xed\xa0\x80"',
    "invalid-utf8": b'"\xc0\x80"',
    "5000-digits": b"9" * 5000,
    "4300-digits": b"9" * 4300,
    "minus-4300-digits": b"-" + b"9" * 4300,
    "deep": b"[" * 5000 + b"]" * 5000,
    "nan": b"NaN",
    "infinity": b"1e400",
    "big-int": b"123456789012345678901234567890",
}


def placements(value: bytes) -> dict[str, bytes]:
    """The hostile value at the top level, in an output, in a VM instance, in another resource's instance and
    as a resource field: each reaches a different piece of the incremental reader."""
    vm = json.dumps(resource("vm", [instance(manifest("web"), index_key="web")])).encode()
    other = b'{"mode":"managed","type":"null_resource","name":"n","instances":[{"attributes":{"a":' + value
    return {
        "top": HEAD + b'"x":' + value + b',"resources":[]}',
        "output": HEAD + b'"outputs":{"o":{"value":' + value + b'}},"resources":[]}',
        "vm-instance": HEAD + b'"resources":[' + vm.replace(b'"id": "0f0e"', b'"id":' + value) + b"]}",
        "other-instance": HEAD + b'"resources":[' + other + b"}}]}]}",
        "resource-field": HEAD + b'"resources":[' + vm[:-1] + b',"each":' + value + b"}]}",
    }


CASES = [
    pytest.param(body, id=f"{name}-{where}")
    for name, value in HOSTILE_VALUES.items()
    for where, body in placements(value).items()
]


@pytest.mark.parametrize("body", CASES)
def test_hostile_values_anywhere_end_as_they_did(body: bytes) -> None:
    """Wherever a value the strict parser refuses sits, the outcome (refused with the stdlib's
    message, or accepted the stdlib's way) is the one parse_state + extract_vms give."""
    assert outcome(read_state, body) == outcome(usual, body)


@pytest.mark.parametrize("body", CASES)
def test_hostile_values_in_large_bodies_end_as_they_did(body: bytes) -> None:
    """The same in a body decoded in pieces (>= 1 MiB), with the padding in an output."""
    padded = body[:-1] + b',"outputs":{"pad":{"value":"' + b"p" * PIECEWISE_DECODE_BYTES + b'"}}}'
    assert outcome(read_state, padded) == outcome(usual, padded)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xef\xbb\xbf" + encode(vm_state(1, {"web": {}})), id="bom"),
        pytest.param(json.dumps(vm_state(1, {"web": {}})).encode("utf-16"), id="utf-16"),
        pytest.param(b"[" * 100_000, id="deep-array"),
        pytest.param(HEAD + b'"resources":{}}', id="resources-object"),
        pytest.param(HEAD + b'"resources":null}', id="resources-null"),
        pytest.param(HEAD + b'"resources":[1,"a",null]}', id="resources-not-objects"),
        pytest.param(HEAD + b'"resources":[{"mode":"managed","instances":{}}]}', id="instances-object"),
        pytest.param(b'{"version":4,"serial":"1","lineage":"x","resources":[]}', id="serial-string"),
        pytest.param(b'{"version":4,"serial":9223372036854775808,"lineage":"x","resources":[]}', id="2^63"),
        pytest.param(b'{"version":3,"serial":1,"lineage":"x","resources":[]}', id="version-3"),
        pytest.param(b'{"serial":1,"encryption_version":"v0","encrypted_data":"e30="}', id="encrypted"),
        pytest.param(HEAD + b'"resources":[],"resources":[]}', id="duplicate-key"),
        pytest.param(HEAD + b'"future_field":1,"resources":[]}', id="unknown-field"),
        pytest.param(b'{"version":4,"lineage":"x","resources":[]}', id="no-serial"),
    ],
)
def test_odd_shapes_end_as_they_did(body: bytes) -> None:
    """A body that is not a plain state's usual layout gets the usual answer."""
    assert outcome(read_state, body) == outcome(usual, body)


def realistic_state(serial: int, memory: dict[str, int]) -> dict[str, Any]:
    """VMs in for_each and count resources, a module, a deposed and a tainted object, and a
    resource of another type: every shape extract_vms knows."""
    return state(
        serial,
        [
            resource("vm", [instance(manifest(n, memory=m), index_key=n) for n, m in memory.items()]),
            resource("db", [instance(manifest("db", memory=512), index_key=0)], module='module.m["a"]'),
            resource("old", [instance(manifest("old"), deposed="00000001", status="tainted")]),
            resource("t", [instance(manifest("tainted"), status="tainted")]),
            resource(
                "q",
                [{"attributes": {"metadata": {"name": "q"}, "spec": {"boot": {"kernel": "k"}}}}],
                type_="qemu_vm",
            ),
            resource("dup", [instance(manifest("web"))]),
            resource("x", [instance({"not": "a manifest"})], type_="null_resource"),
        ],
    )


def test_same_answer_as_parse_and_extract_for_a_real_layout() -> None:
    """Summary fields and every declared VM, problem and duplicate are those of extract_vms."""
    body = encode(realistic_state(7, {"web": 256, "api": 300}))
    summary, extraction = read_state(body)
    expected_summary, expected = usual(body)
    assert (summary.serial, summary.lineage, summary.encryption_version) == (
        7,
        expected_summary.lineage,
        None,
    )
    assert extraction == expected
    assert summary.strict


def test_unchanged_instances_are_not_validated_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second write with one VM changed validates that one VM only (a seam counts validations)."""
    validated: list[str] = []
    real_declare = tfstate._declare

    def counting(address: str, raw: dict[str, Any]) -> Any:
        validated.append(address)
        return real_declare(address, raw)

    monkeypatch.setattr(tfstate, "_declare", counting)
    memory = {f"vm-{i}": 256 for i in range(50)}
    read_state(encode(realistic_state(1, memory)))
    assert len(validated) == 50 + 4  # db, tainted, qemu_vm and the duplicate; never the deposed one
    validated.clear()
    _, extraction = read_state(encode(realistic_state(2, {**memory, "vm-7": 512})))
    assert validated == ['terraform_data.vm["vm-7"]']
    assert extraction is not None
    assert next(vm for vm in extraction.vms if vm.name == "vm-7").spec["memory"] == 512


def test_unchanged_instances_are_not_decoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the changed instance's slice is decoded as a value; the rest are looked up."""
    memory = {f"vm-{i}": 256 for i in range(20)}
    read_state(encode(realistic_state(1, memory)))
    decoded: list[bytes] = []

    class CountingDecoder:
        def decode(self, raw: bytes) -> Any:
            decoded.append(bytes(raw))
            return msgspec.json.decode(raw)

    monkeypatch.setattr(state_reader, "_ANY", CountingDecoder())
    read_state(encode(realistic_state(2, {**memory, "vm-3": 300})))
    instances = [d for d in decoded if b'"attributes"' in d]
    assert len(instances) == 1
    assert b'"vm-3"' in instances[0]


def test_an_instance_moved_to_another_resource_is_read_again() -> None:
    """The key holds the resource: the same instance bytes under another name get its address."""
    vm = [instance(manifest("web"), index_key=0)]
    read_state(encode(state(1, [resource("a", vm)])))
    _, extraction = read_state(encode(state(2, [resource("b", vm)])))
    assert extraction is not None
    assert [v.address for v in extraction.vms] == ["terraform_data.b[0]"]


def test_cache_is_bounded_in_bytes() -> None:
    """Distinct states cost the cache at most its byte bound; oversized slices are not kept."""
    cache = state_reader._InstanceCache(max_bytes=1000)
    for i in range(100):
        cache.put((b"p", b"x" * 90 + str(i).encode()), None)
    assert cache._bytes <= 1000
    assert cache.get((b"p", b"x" * 90 + b"99")) == (None,)
    assert cache.get((b"p", b"x" * 90 + b"0")) is None
    big = (b"p", b"y" * state_reader.CACHED_INSTANCE_MAX_BYTES)
    cache.put(big, None)
    assert cache.get(big) is None


def test_documented_cache_bounds() -> None:
    assert state_reader.INSTANCE_CACHE_BYTES == 64 * 1024 * 1024
    assert state_reader.CACHED_INSTANCE_MAX_BYTES == 256 * 1024
    assert json_body.PIECEWISE_DECODE_BYTES == 1024 * 1024


def test_strict_flag_says_which_parser_read_the_body() -> None:
    """NaN is read by the stdlib alone; its manifests must not be cached by an encoding that
    writes NaN as null (extract_vms cache=False)."""
    assert decode_json(b'{"a":1}', what="state") == ({"a": 1}, True)
    document, strict = decode_json(b'{"a":NaN}', what="state")
    assert not strict
    assert document["a"] != document["a"]


def test_nan_and_null_manifests_stay_distinct() -> None:
    """A NaN memory is invalid while a null one means the default, whatever was read first."""
    null_body = encode(vm_state(1, {"web": {"memory": None}}))
    nan_body = null_body.replace(b'"memory": null', b'"memory": NaN')
    _, with_null = read_state(null_body)
    _, with_nan = read_state(nan_body)
    assert with_null is not None
    assert with_nan is not None
    assert with_null.vms[0].error is None
    assert with_nan.vms[0].error is not None
