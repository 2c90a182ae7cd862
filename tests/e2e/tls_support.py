"""A throw-away PKI for the TLS tests: a CA, a server certificate for 127.0.0.1 and a client
certificate, made with the openssl command."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL_TIMEOUT = 30.0
# The client certificate's subject CN: the user it logs in as with tls_client_cert_users.
CLIENT_CN = "/CN=terraform"


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
        directory, "client", CLIENT_CN, (ca_cert, ca_key), "extendedKeyUsage=clientAuth\n"
    )
    return Pki(ca_cert, server_cert, server_key, client_cert, client_key)


def client_context(pki: Pki, *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if with_certificate:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context
