"""The pure parts of the Kubernetes client support: field selectors and the kubeconfig."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
import yaml

from api.client.kubeconfig import NEW_TOKEN_BYTES, kubeconfig, server_url
from api.infra.credentials import load_credentials
from api.infra.settings import SettingsError
from api.kube import QEMUVM_FIELDS, FieldSelectorError, parse_field_selector
from api.settings import ServerSettings
from controller.cli import main


@pytest.mark.parametrize(
    ("text", "fields", "matches"),
    [
        ("metadata.name=web", {"metadata.name": "web"}, True),
        ("metadata.name==web", {"metadata.name": "db"}, False),
        ("metadata.name!=web", {"metadata.name": "db"}, True),
        (
            "metadata.name=web,metadata.namespace=lab",
            {"metadata.name": "web", "metadata.namespace": "x"},
            False,
        ),
        (" metadata.name = web ", {"metadata.name": "web"}, True),
        ("", {}, True),
    ],
)
def test_field_selectors_match_as_kubernetes_does(text: str, fields: dict[str, str], matches: bool) -> None:
    assert parse_field_selector(text, QEMUVM_FIELDS).matches(fields) is matches


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spec.cpus=1", "field label not supported: spec.cpus"),
        ("metadata.name", "invalid selector"),
        ("metadata.name=" + "x" * 5000, "at most 4096 characters"),
    ],
)
def test_bad_field_selectors_say_why(text: str, message: str) -> None:
    with pytest.raises(FieldSelectorError, match=message):
        parse_field_selector(text, QEMUVM_FIELDS)


def test_the_kubeconfig_holds_server_ca_token_and_namespace() -> None:
    document = kubeconfig(server="https://127.0.0.1:8443", ca_pem=b"PEM", token="t0k", namespace="lab")
    assert document["clusters"][0]["cluster"] == {
        "server": "https://127.0.0.1:8443",
        "certificate-authority-data": base64.b64encode(b"PEM").decode(),
    }
    assert document["users"][0]["user"] == {"token": "t0k"}
    assert document["contexts"][0]["context"] == {
        "cluster": "tofu-qemu",
        "user": "tofu-qemu",
        "namespace": "lab",
    }
    assert document["current-context"] == "tofu-qemu"


def test_a_plain_http_kubeconfig_is_refused_unless_asked_for() -> None:
    """kubectl sends no token over plain HTTP: such a kubeconfig would only fail later."""
    with pytest.raises(SettingsError, match="not https"):
        kubeconfig(server="http://127.0.0.1:8080", ca_pem=None, token="t")
    assert kubeconfig(server="http://127.0.0.1:8080", ca_pem=None, token=None, allow_http=True)["users"]


def test_the_server_url_follows_the_listen_and_tls_settings() -> None:
    assert server_url(ServerSettings(listen="127.0.0.1:8443", tls_cert="c.pem")) == "https://127.0.0.1:8443"
    assert server_url(ServerSettings(listen="[::1]:8080")) == "http://[::1]:8080"
    with pytest.raises(SettingsError, match="--server"):
        server_url(ServerSettings(listen="0.0.0.0:8443"))


def test_a_new_token_comes_with_its_users_file_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--new-token NAME: a random token of NEW_TOKEN_BYTES in the kubeconfig, and on stderr the
    hashed line that makes the server accept it."""
    for name in [key for key in os.environ if key.startswith("TOFU_QEMU_")]:
        monkeypatch.delenv(name)
    certificate = tmp_path / "server.pem"
    certificate.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    argv = ["kubeconfig", "--listen", "127.0.0.1:8443", "--tls-cert", str(certificate), "--new-token", "kube"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    token = yaml.safe_load(printed.out)["users"][0]["user"]["token"]
    assert len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) == NEW_TOKEN_BYTES == 32
    users_file = tmp_path / "users.toml"
    users_file.write_text("[tokens]\n" + printed.err.strip().splitlines()[-1] + "\n")
    credentials = load_credentials(users=None, tokens=None, users_file=users_file)
    assert credentials.check_bearer(token) == "token:kube"
