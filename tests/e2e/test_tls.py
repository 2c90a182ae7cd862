"""HTTPS and mutual TLS, with Terraform as the client (client_*_pem settings:
docs/backend.md#configuring-the-client)."""

from __future__ import annotations

import ssl
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ServerProcess, Terraform, copy_example, terraform_env
from tests.e2e.tls_support import Pki, client_context, pki

__all__ = ["pki"]  # fixtures
pytestmark = pytest.mark.e2e


@pytest.fixture
def mtls_server(pki: Pki, tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        data_dir=tmp_path / "data",
        log_path=tmp_path / "server.log",
        extra_args=["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                    "--tls-client-ca", str(pki.ca_cert)],
        client_tls=client_context(pki, with_certificate=True),
    )  # fmt: skip
    try:
        server.start()
        yield server
    finally:
        server.kill()


def test_mtls_refuses_a_client_without_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    """With a client CA configured, a TLS client without a certificate cannot even connect."""
    anonymous = ServerProcess(
        data_dir=mtls_server.data_dir,
        log_path=mtls_server.log_path,
        port=mtls_server.port,
        client_tls=client_context(pki, with_certificate=False),
    )
    # The handshake is refused: urllib reports the TLS alert, or the reset that follows it.
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionResetError)):
        anonymous.request("GET", "/readyz", auth=None)
    assert mtls_server.request("GET", "/readyz", auth=None).status == 200


def test_terraform_applies_over_mutual_tls(
    mtls_server: ServerProcess, pki: Pki, tmp_path: Path, terraform_bin: str
) -> None:
    """Terraform with client_*_pem settings applies through HTTPS with a client certificate."""
    env = terraform_env(state_url=mtls_server.state_url("tls"), scratch=tmp_path / "scratch")
    env["TF_HTTP_CLIENT_CA_CERTIFICATE_PEM"] = pki.ca_cert.read_text()
    env["TF_HTTP_CLIENT_CERTIFICATE_PEM"] = pki.client_cert.read_text()
    env["TF_HTTP_CLIENT_PRIVATE_KEY_PEM"] = pki.client_key.read_text()
    terraform = Terraform(terraform_bin, copy_example("quickstart", tmp_path / "tf"), env=env)
    terraform.run("init")
    terraform.run("apply", "-auto-approve")
    assert mtls_server.vm("tls", "hello")["metadata"]["generation"] == 1
