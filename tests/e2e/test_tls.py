"""HTTPS and mutual TLS, with Terraform as the client (client_*_pem settings:
docs/backend.md#configuring-the-client)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import ServerProcess, Terraform, copy_example, terraform_env

pytestmark = pytest.mark.e2e
OPENSSL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path) -> None:
    binary = shutil.which("openssl")
    assert binary, "the openssl command is needed to make test certificates"
    subprocess.run([binary, *map(str, args)], check=True, capture_output=True, timeout=OPENSSL_TIMEOUT)


def _issue(
    directory: Path, name: str, subject: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "pem", "ext"))
    ext.write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", subject)  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-days", "2", "-out", cert, "-extfile", ext)  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throw-away CA with a server certificate for 127.0.0.1 and a client certificate."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", ca_key, "-out", ca_cert, "-days", "2", "-subj", "/CN=tofu-qemu test CA")  # fmt: skip
    server_cert, server_key = _issue(
        directory, "server", "/CN=127.0.0.1", (ca_cert, ca_key),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )  # fmt: skip
    client_cert, client_key = _issue(
        directory, "client", "/CN=terraform", (ca_cert, ca_key), "extendedKeyUsage=clientAuth\n"
    )
    return Pki(ca_cert, server_cert, server_key, client_cert, client_key)


def _client_context(pki: Pki, *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if with_certificate:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


@pytest.fixture
def mtls_server(pki: Pki, tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        data_dir=tmp_path / "data",
        log_path=tmp_path / "server.log",
        extra_args=["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                    "--tls-client-ca", str(pki.ca_cert)],
        client_tls=_client_context(pki, with_certificate=True),
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
        client_tls=_client_context(pki, with_certificate=False),
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
