"""QemuVM manifest validation: what is accepted, how it is normalised, and what errors say."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from api.spec_fields import describe_validation_error
from api.types import QemuVMManifest, QemuVMSpec, canonical_spec

KERNEL = {"kernel": "tiny-guest/vmlinuz"}


def spec_error(raw: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        QemuVMSpec.model_validate(raw)
    return describe_validation_error(caught.value, prefix="spec")


def test_defaults_are_part_of_the_canonical_form() -> None:
    """A minimal spec dumps every field (but the unset type references), so omitted and explicit
    defaults compare equal."""
    dumped = canonical_spec(QemuVMSpec.model_validate({"boot": KERNEL}))
    assert dumped == {
        "cpus": 1,
        "memory": 512,
        "machine": "q35",
        "accel": "auto",
        "runStrategy": "Always",
        "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": None, "cmdline": ""},
        "disks": [],
        "network": {"forwards": []},
        "cloudInit": None,
        "firmware": {"type": "bios", "secureBoot": False, "reclaimPolicy": "Delete"},
        "tpm": None,
        "stopTimeout": 30,
        "startStrategy": "Running",
    }


def test_quantities_normalise() -> None:
    """ "2Gi" memory, "1Gi" disks and "2m" timeouts become integers of MiB and seconds."""
    spec = QemuVMSpec.model_validate(
        {
            "memory": "2Gi",
            "disks": [{"name": "root", "image": "base.qcow2", "size": "1Gi"}],
            "stopTimeout": "2m",
        }
    )
    assert (spec.memory, spec.disks[0].size, spec.stop_timeout) == (2048, 1024, 120)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param({"memory": 8, "boot": KERNEL}, "spec.memory: must be ≥ 16 MiB", id="memory-too-small"),
        pytest.param({"memory": 0, "boot": KERNEL}, "spec.memory: must be ≥ 16 MiB", id="memory-zero"),
        pytest.param({"memory": -1, "boot": KERNEL}, "spec.memory: must be ≥ 16 MiB", id="memory-negative"),
        pytest.param(
            {"memory": 10**30, "boot": KERNEL}, "spec.memory: must be ≤ 1048576 MiB", id="memory-huge"
        ),
        pytest.param({"memory": 1.5, "boot": KERNEL}, "spec.memory: must be an integer", id="memory-float"),
        pytest.param(
            {"cpus": "2", "boot": KERNEL}, "spec.cpus: Input should be a valid integer", id="cpus-string"
        ),
        pytest.param({"cpus": 0, "boot": KERNEL}, "spec.cpus: must be ≥ 1", id="cpus-zero"),
        pytest.param({"cpus": True, "boot": KERNEL}, "spec.cpus", id="cpus-bool"),
        pytest.param({"machine": "pc", "boot": KERNEL}, "spec.machine", id="machine-unknown"),
        pytest.param({"boot": {"kernel": "../../etc/passwd"}}, "spec.boot.kernel", id="kernel-traversal"),
        pytest.param({"boot": {"kernel": "/boot/vmlinuz"}}, "spec.boot.kernel", id="kernel-absolute"),
        pytest.param({"boot": {"kernel": "a,b=c"}}, "spec.boot.kernel", id="kernel-qemu-option-syntax"),
        pytest.param({"boot": {"kernel": "-hda"}}, "spec.boot.kernel", id="kernel-leading-dash"),
        pytest.param({"boot": {"kernel": "k", "cmdline": "a\nb"}}, "spec.boot.cmdline", id="cmdline-newline"),
        pytest.param(
            {"boot": {"kernel": "k", "cmdline": "x" * 5000}}, "spec.boot.cmdline", id="cmdline-long"
        ),
        pytest.param({"disks": [{"name": "d"}]}, "a disk needs an image, a size, or both", id="disk-empty"),
        pytest.param(
            {"disks": [{"name": "d", "image": "a.qcow2"}, {"name": "d", "image": "b.qcow2"}]},
            "disk names must be unique",
            id="disk-duplicate",
        ),
        pytest.param({"disks": [{"name": "Root", "image": "a"}]}, "spec.disks[0].name", id="disk-name-upper"),
        pytest.param({}, "spec: nothing to boot", id="nothing-to-boot"),
        pytest.param(
            {"boot": KERNEL, "network": {"forwards": [{"guestPort": 80}, {"guestPort": 80}]}},
            "forwarded twice",
            id="forward-duplicate",
        ),
        pytest.param(
            {"boot": KERNEL, "network": {"forwards": [{"guestPort": 80, "hostPort": 80}]}},
            "spec.network.forwards[0].hostPort: must be ≥ 1024",
            id="privileged-host-port",
        ),
        pytest.param(
            {"boot": KERNEL, "memroy": 512}, "spec.memroy: Extra inputs are not permitted", id="typo"
        ),
    ],
)
def test_invalid_specs_name_the_field(raw: dict[str, Any], message: str) -> None:
    """Every rejection names the field and says what is allowed."""
    assert message in spec_error(raw)


def test_manifest_requires_api_version_and_kind() -> None:
    """A manifest of another kind is not a QemuVM."""
    with pytest.raises(ValidationError, match="kind"):
        QemuVMManifest.model_validate(
            {
                "apiVersion": "tofu-qemu.dev/v1alpha1",
                "kind": "Pod",
                "metadata": {"name": "a"},
                "spec": {"boot": KERNEL},
            }
        )


@pytest.mark.parametrize(
    "labels",
    [{"Bad Key": "x"}, {"k": "has space"}, {"k": "x" * 64}, {f"k{i}": "v" for i in range(65)}],
    ids=["key-space", "value-space", "value-long", "too-many"],
)
def test_invalid_labels(labels: dict[str, str]) -> None:
    """Labels follow Kubernetes' rules."""
    with pytest.raises(ValidationError, match="label"):
        QemuVMManifest.model_validate(
            {
                "apiVersion": "tofu-qemu.dev/v1alpha1",
                "kind": "QemuVM",
                "metadata": {"name": "a", "labels": labels},
                "spec": {"boot": KERNEL},
            }
        )
