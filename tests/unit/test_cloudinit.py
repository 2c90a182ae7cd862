"""The NoCloud seed files: exact user-data, meta-data with identity and keys, deterministic output."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.types import CloudInitSpec, QemuVMSpec
from controller.cloudinit import instance_id, seed_digest, seed_files

UID = "6f1c1d1e-4c5b-4d59-9f40-0d4b0a6c1e11"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyExampleKeyExampleKeyExampleKey alice@laptop"


def cloud_init(**fields: Any) -> CloudInitSpec:
    """A CloudInitSpec parsed the way manifests are (camelCase keys, validators run)."""
    return CloudInitSpec.model_validate(fields)


def files(spec: CloudInitSpec, *, name: str = "web") -> dict[str, bytes]:
    return seed_files(spec, uid=UID, name=name)


def meta_data(spec: CloudInitSpec) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads(files(spec)["meta-data"])
    return meta


def test_string_user_data_is_written_byte_for_byte() -> None:
    """Text user-data (a script, odd characters, no final newline) reaches the seed unchanged."""
    text = "#!/bin/sh\necho 'héllo, wörld' \"$HOME\" \\t\r\n# ✓ tab:\there\n--- no final newline"

    assert files(cloud_init(userData=text))["user-data"] == text.encode()


def test_object_user_data_becomes_cloud_config_json() -> None:
    """An object is written as #cloud-config followed by sorted, indented JSON (which is YAML)."""
    data = {"packages": ["nginx"], "runcmd": [["echo", "ünïcode"]], "hostname": "web"}

    user_data = files(cloud_init(userData=data))["user-data"]

    assert user_data.startswith(b"#cloud-config\n")
    assert json.loads(user_data.removeprefix(b"#cloud-config\n")) == data
    assert "ünïcode".encode() in user_data  # ensure_ascii=False: readable in the guest
    assert user_data.index(b'"hostname"') < user_data.index(b'"packages"') < user_data.index(b'"runcmd"')


def test_missing_user_data_is_an_empty_cloud_config() -> None:
    """No user-data still gives a valid #cloud-config document, so cloud-init runs its defaults."""
    user_data = files(cloud_init())["user-data"]

    assert user_data.startswith(b"#cloud-config\n")
    assert json.loads(user_data.removeprefix(b"#cloud-config\n")) == {}


def test_meta_data_names_the_instance_and_host() -> None:
    """meta-data carries the instance-id and the VM name as local-hostname; no keys means no public-keys."""
    spec = cloud_init()

    meta = meta_data(spec)

    assert meta == {"instance-id": instance_id(spec, uid=UID), "local-hostname": "web"}


def test_ssh_keys_go_to_meta_data_public_keys_whatever_the_user_data() -> None:
    """Keys are in meta-data, so a shell-script user-data still gets them installed."""
    spec = cloud_init(userData="#!/bin/sh\ntrue\n", sshAuthorizedKeys=[KEY])

    assert meta_data(spec)["public-keys"] == [KEY]
    assert KEY.encode() not in files(spec)["user-data"]


def test_user_meta_data_overrides_generated_keys() -> None:
    """The user's metaData keys win, including instance-id and local-hostname, and extra keys are kept."""
    spec = cloud_init(
        metaData={"instance-id": "mine", "local-hostname": "other", "dsmode": "local"},
        sshAuthorizedKeys=[KEY],
    )

    assert meta_data(spec) == {
        "instance-id": "mine",
        "local-hostname": "other",
        "dsmode": "local",
        "public-keys": [KEY],
    }


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"networkConfig": {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}}}, {"version": 2}),
    ],
    ids=["absent", "given"],
)
def test_network_config_is_written_only_when_given(fields: dict[str, Any], expected: Any) -> None:
    """network-config is a file of the seed only when the spec has one, and then it is the JSON object."""
    seed = files(cloud_init(**fields))

    if expected is None:
        assert sorted(seed) == ["meta-data", "user-data"]
    else:
        assert json.loads(seed["network-config"]) == fields["networkConfig"]


def test_instance_id_is_stable_for_the_same_config() -> None:
    """Two renderings of equal configs (key order aside) give the same instance-id."""
    first = cloud_init(userData={"a": 1, "b": 2}, metaData={"x": 1})
    second = cloud_init(metaData={"x": 1}, userData={"b": 2, "a": 1})

    assert instance_id(first, uid=UID) == instance_id(second, uid=UID)
    assert instance_id(first, uid=UID).startswith("i-6f1c1d1e-")


@pytest.mark.parametrize(
    "changed",
    [
        {"userData": "#cloud-config\n{}\n "},
        {"metaData": {"x": 2}},
        {"networkConfig": {"version": 2}},
        {"sshAuthorizedKeys": [KEY]},
    ],
    ids=["user-data", "meta-data", "network-config", "ssh-keys"],
)
def test_instance_id_changes_with_the_config(changed: dict[str, Any]) -> None:
    """Any change to the cloud-init config gives a new instance-id, so cloud-init applies it."""
    base = cloud_init(userData="#cloud-config\n{}\n", metaData={"x": 1})
    modified = cloud_init(**{"userData": "#cloud-config\n{}\n", "metaData": {"x": 1}, **changed})

    assert instance_id(modified, uid=UID) != instance_id(base, uid=UID)


def test_instance_id_ignores_the_rest_of_the_spec() -> None:
    """Memory or CPU changes (a generation bump) keep the instance-id: no new SSH host keys."""
    seed = {"cloudInit": {"userData": {"packages": ["nginx"]}}, "boot": {"kernel": "k/vmlinuz"}}
    small = QemuVMSpec.model_validate({**seed, "memory": 256, "cpus": 1})
    large = QemuVMSpec.model_validate({**seed, "memory": 4096, "cpus": 4})
    assert small.cloud_init is not None
    assert large.cloud_init is not None

    assert files(small.cloud_init) == files(large.cloud_init)


def test_instance_id_differs_between_vms() -> None:
    """Two VMs with the same config get different instance-ids (the uid is part of it)."""
    spec = cloud_init()
    other_uid = "0a1b2c3d-0000-4000-8000-000000000000"

    assert instance_id(spec, uid=UID) != instance_id(spec, uid=other_uid)


def test_seed_files_are_deterministic() -> None:
    """Rendering the same spec twice gives byte-identical files and the same digest."""
    fields = {
        "userData": {"write_files": [{"path": "/etc/x", "content": "y"}], "bootcmd": ["true"]},
        "metaData": {"b": 1, "a": 2},
        "networkConfig": {"version": 1, "config": []},
        "sshAuthorizedKeys": [KEY],
    }

    first, second = files(cloud_init(**fields)), files(cloud_init(**fields))

    assert first == second
    assert seed_digest(first) == seed_digest(second)


@pytest.mark.parametrize(
    "other",
    [
        {"user-data": b"a", "meta-data": b"bc"},
        {"user-data": b"ab", "meta-data": b"d"},
        {"user-data": b"ab", "meta-datb": b"c"},
        {"user-data": b"ab", "meta-data": b"c", "network-config": b""},
    ],
    ids=["bytes-moved-between-files", "other-content", "other-name", "extra-empty-file"],
)
def test_seed_digest_changes_with_any_name_or_byte(other: dict[str, bytes]) -> None:
    """The digest covers names, boundaries and content, so any change renames the ISO."""
    base = {"user-data": b"ab", "meta-data": b"c"}

    assert seed_digest(other) != seed_digest(base)
    assert len(seed_digest(base)) == 16
