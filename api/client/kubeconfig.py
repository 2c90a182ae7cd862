"""`tofu-qemu kubeconfig`: a ready kubeconfig for kubectl, k9s and client-go (docs/kubectl.md).

The server URL and its CA come from the same settings `tofu-qemu serve` reads (flags, TOFU_QEMU_*
environment, config file): https when tls_cert is set, the listen address, and the server's own
certificate file as the trusted CA unless `--ca-file` names the CA that signed it. The user is a
bearer token (TOFU_QEMU_TOKEN, else the first of TOFU_QEMU_TOKENS, else a new one with
`--new-token NAME`, whose users-file line is printed on stderr), a client certificate, or both.

kubectl sends credentials only over TLS, so a kubeconfig for a plain-HTTP server is refused
unless `--insecure-http` says it is meant for a loopback test.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from api.infra.credentials import hash_password
from api.infra.settings import SettingsError, load_settings
from api.settings import ServerSettings

NAME = "tofu-qemu"
NEW_TOKEN_BYTES = 32


def add_kubeconfig_command(commands: Any) -> None:
    parser = commands.add_parser("kubeconfig", help="print a kubeconfig for kubectl (docs/kubectl.md)")
    parser.add_argument("--config", type=Path, help="the server's TOML config file (also $TOFU_QEMU_CONFIG)")
    parser.add_argument(
        "--server", help="the URL clients use (default: from the server's listen and TLS settings)"
    )
    parser.add_argument(
        "--ca-file", type=Path, help="the CA that signed the server's certificate (default: it)"
    )
    parser.add_argument("--namespace", "-n", help="the context's default namespace (a project)")
    parser.add_argument(
        "--new-token", metavar="NAME", help="make a new token; its users-file line goes to stderr"
    )
    parser.add_argument("--client-certificate", type=Path, help="embed this client certificate (mTLS)")
    parser.add_argument("--client-key", type=Path, help="the client certificate's key")
    parser.add_argument(
        "--insecure-http", action="store_true", help="allow an http:// server (kubectl sends no token)"
    )
    for name in ("listen", "tls_cert", "tokens"):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help="as for serve")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    flags = {name: getattr(args, name) for name in ("listen", "tls_cert", "tokens")}
    settings = load_settings(ServerSettings, flags=flags, env=os.environ, config_file=args.config)
    token, users_file_line = _token(args, settings, os.environ)
    document = kubeconfig(
        server=args.server or server_url(settings),
        ca_pem=_read(args.ca_file or settings.tls_cert),
        token=token,
        client_pem=(_read(args.client_certificate), _read(args.client_key))
        if args.client_certificate
        else None,
        namespace=args.namespace,
        allow_http=args.insecure_http,
    )
    if users_file_line:
        print(
            f"tofu-qemu: add to the users file's [tokens] table, then restart:\n{users_file_line}",
            file=sys.stderr,
        )
    sys.stdout.write(yaml.safe_dump(document, sort_keys=False))
    return 0


def server_url(settings: ServerSettings) -> str:
    host = settings.host
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - naming the wildcard, not binding it
        raise SettingsError(f"the server listens on every address ({settings.listen}): pass --server URL")
    try:
        shown = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        shown = host
    scheme = "https" if settings.tls_cert is not None else "http"
    return f"{scheme}://{shown}:{settings.port}"


def _token(
    args: argparse.Namespace, settings: ServerSettings, env: Mapping[str, str]
) -> tuple[str | None, str]:
    if args.new_token:
        token = secrets.token_urlsafe(NEW_TOKEN_BYTES)
        return token, f'{args.new_token} = "{hash_password(token)}"'
    configured = env.get("TOFU_QEMU_TOKEN") or next(filter(None, (settings.tokens or "").split(",")), None)
    if configured is None and args.client_certificate is None:
        raise SettingsError(
            "no credentials: set TOFU_QEMU_TOKEN, pass --new-token NAME or --client-certificate"
        )
    return (configured.strip() if configured else None), ""


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise SettingsError(f"cannot read {path}: {err.strerror}") from err


def kubeconfig(
    *,
    server: str,
    ca_pem: bytes | None,
    token: str | None,
    client_pem: tuple[bytes | None, bytes | None] | None = None,
    namespace: str | None = None,
    allow_http: bool = False,
) -> dict[str, Any]:
    """The kubeconfig document. Pure. :raise SettingsError: a plain-HTTP server not allowed."""
    if not server.startswith("https://") and not allow_http:
        raise SettingsError(
            f"{server} is not https: kubectl sends no token over plain HTTP; serve with --tls-cert/--tls-key "
            "(or pass --insecure-http for a loopback test without auth)"
        )
    cluster: dict[str, Any] = {"server": server}
    if ca_pem is not None:
        cluster["certificate-authority-data"] = _b64(ca_pem)
    user: dict[str, Any] = {}
    if token:
        user["token"] = token
    if client_pem is not None:
        cert, key = client_pem
        if cert is None or key is None:
            raise SettingsError("--client-certificate needs --client-key")
        user["client-certificate-data"], user["client-key-data"] = _b64(cert), _b64(key)
    context: dict[str, Any] = {"cluster": NAME, "user": NAME}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": NAME, "cluster": cluster}],
        "users": [{"name": NAME, "user": user}],
        "contexts": [{"name": NAME, "context": context}],
        "current-context": NAME,
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
