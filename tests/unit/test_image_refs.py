"""What a disk's `image`/`sha256` and `cloudInit` accept, and what the refusals say."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from api.images import CachedImage, LocalImage, RemoteImage, parse_sidecar
from api.spec_fields import describe_validation_error
from api.types import DiskSpec, QemuVMSpec

DIGEST = "0123456789abcdef" * 4


def disk_error(**fields: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        DiskSpec.model_validate({"name": "root", **fields})
    return describe_validation_error(caught.value)


@pytest.mark.parametrize(
    ("fields", "source"),
    [
        pytest.param({"image": "debian/12.qcow2"}, LocalImage("debian/12.qcow2"), id="file"),
        pytest.param({"image": f"sha256:{DIGEST}"}, CachedImage(DIGEST), id="cache"),
        pytest.param(
            {"image": "https://x.example/a.img", "sha256": DIGEST.upper()},
            RemoteImage("https://x.example/a.img", DIGEST),
            id="url-with-digest",
        ),
        pytest.param(
            {"image": "http://10.0.0.1:8000/a.img"},
            RemoteImage("http://10.0.0.1:8000/a.img", None),
            id="sidecar",
        ),
    ],
)
def test_image_forms(fields: dict[str, Any], source: object) -> None:
    assert DiskSpec.model_validate({"name": "root", **fields}).source == source


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"image": "sha256:abc"}, "not a sha256 digest", id="short-digest"),
        pytest.param(
            {"image": "ftp://x.example/a.img"}, "must be a file name inside the images dir", id="ftp"
        ),
        pytest.param({"image": "https://user:pw@x.example/a"}, "may not carry credentials", id="credentials"),
        pytest.param({"image": "https://x.example/a b"}, "spaces or control characters", id="space"),
        pytest.param({"image": "https:///a.img"}, "has no host", id="no-host"),
        pytest.param({"image": "https://x.example:99999/a"}, "malformed", id="bad-port"),
        pytest.param({"image": "https://x.example/a#f"}, "#fragment", id="fragment"),
        pytest.param({"image": "https://x.example/" + "a" * 3000}, "at most 2048", id="long"),
        pytest.param({"image": "base.raw", "sha256": DIGEST}, "URL images only", id="digest-on-file"),
        pytest.param(
            {"image": "https://x.example/a", "sha256": "xyz"}, "not a sha256 digest", id="bad-digest"
        ),
    ],
)
def test_bad_images_are_refused_clearly(fields: dict[str, Any], message: str) -> None:
    assert message in disk_error(**fields)


def test_cloud_init_accepts_text_or_an_object() -> None:
    text = QemuVMSpec.model_validate(
        {"boot": {"kernel": "k"}, "cloudInit": {"userData": "#!/bin/sh\necho hi\n"}}
    ).cloud_init
    assert text is not None
    assert text.user_data == "#!/bin/sh\necho hi\n"
    obj = QemuVMSpec.model_validate(
        {
            "boot": {"kernel": "k"},
            "cloudInit": {
                "userData": {"packages": ["nginx"]},
                "metaData": {"zone": "a"},
                "networkConfig": {"version": 2},
                "sshAuthorizedKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB me@laptop"],
            },
        }
    ).cloud_init
    assert obj is not None
    assert obj.user_data == {"packages": ["nginx"]}
    assert obj.ssh_authorized_keys == ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB me@laptop",)


@pytest.mark.parametrize(
    ("cloud_init", "message"),
    [
        pytest.param({"userData": "x" * (65 * 1024)}, "at most 64 KiB", id="big-text"),
        pytest.param({"userData": {"a": "x" * (65 * 1024)}}, "at most 64 KiB as JSON", id="big-object"),
        pytest.param({"userData": "a\x00b"}, "NUL", id="nul"),
        pytest.param({"sshAuthorizedKeys": ["not a key"]}, "not an OpenSSH public key", id="bad-key"),
        pytest.param({"sshAuthorizedKeys": ["ssh-rsa AAAA\nssh-rsa BBBB"]}, "not an OpenSSH", id="two-lines"),
        pytest.param({"sshAuthorizedKeys": ["ssh-rsa AAAA"] * 40}, "at most 32 SSH keys", id="many-keys"),
        pytest.param({"metaData": "x"}, "valid dictionary", id="meta-not-object"),
        pytest.param({"userdata": "x"}, "Extra inputs are not permitted", id="typo"),
    ],
)
def test_bad_cloud_init_is_refused_clearly(cloud_init: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        QemuVMSpec.model_validate({"boot": {"kernel": "k"}, "cloudInit": cloud_init})
    assert message in describe_validation_error(caught.value, prefix="spec")


@pytest.mark.parametrize(
    ("text", "digest"),
    [
        pytest.param(f"{DIGEST}\n", DIGEST, id="bare"),
        pytest.param(f"{DIGEST}  a.img\n", DIGEST, id="sha256sum"),
        pytest.param(f"{'f' * 64}  other.img\n{DIGEST} *a.img\n", DIGEST, id="binary-mode-among-many"),
        pytest.param(f"{DIGEST.upper()}  ./dir/a.img", DIGEST, id="uppercase-with-dir"),
        pytest.param(f"{'f' * 64}  other.img\n{'e' * 64}  more.img\n", None, id="not-named"),
        pytest.param("<html>404</html>", None, id="not-a-sidecar"),
    ],
)
def test_sidecar_parsing(text: str, digest: str | None) -> None:
    assert parse_sidecar(text, "https://x.example/dir/a.img") == digest
