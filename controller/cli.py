"""The `tofu-qemu` command: the composition root that wires settings, store, server (and, later,
the controller) together.

Flags are generated from the settings model, so every setting has a flag, an environment variable
and a config-file key of the same name (see api/settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from api.credentials import CredentialsError, hash_password, load_credentials
from api.logs import configure_logging
from api.server import create_app
from api.settings import ServerSettings, SettingsError, load_settings

log = structlog.get_logger("tofu_qemu")
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (SettingsError, CredentialsError) as err:
        print(f"tofu-qemu: {err}", file=sys.stderr)
        return EXIT_USAGE


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tofu-qemu", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the state backend and API (and the controller, once it exists)"
    )
    _add_settings_flags(serve, ServerSettings)
    serve.set_defaults(run=_serve)
    api_only = commands.add_parser("api", help="run only the state backend and API")
    _add_settings_flags(api_only, ServerSettings)
    api_only.set_defaults(run=_serve)
    hasher = commands.add_parser("hash-password", help="print a salted hash for a users file")
    hasher.add_argument("--stdin", action="store_true", help="read the password from standard input")
    hasher.set_defaults(run=_hash_password)
    return parser


def _add_settings_flags(parser: argparse.ArgumentParser, model: type[ServerSettings]) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (also $TOFU_QEMU_CONFIG)")
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default
        help_text = f"{field.description or ''} (env TOFU_QEMU_{name.upper()}; default {default!s})"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)


def _settings_from(args: argparse.Namespace) -> ServerSettings:
    flags: dict[str, Any] = {name: getattr(args, name, None) for name in ServerSettings.model_fields}
    return load_settings(ServerSettings, flags=flags, env=os.environ, config_file=args.config)


def _serve(args: argparse.Namespace) -> int:
    settings = _settings_from(args)
    configure_logging(settings.log_format, settings.log_level)
    credentials = load_credentials(
        users=settings.users, tokens=settings.tokens, users_file=settings.users_file
    )
    if not credentials.enabled:
        if not settings.is_loopback and not settings.insecure_no_auth:
            raise SettingsError(
                f"refusing to serve {settings.listen} without authentication: set TOFU_QEMU_USERS, "
                "TOFU_QEMU_TOKENS or --users-file, or pass --insecure-no-auth"
            )
        log.warning("auth_disabled", listen=settings.listen)
    app = create_app(settings, credentials=credentials)
    asyncio.run(_run_until_signalled(app, settings))
    return 0


async def _run_until_signalled(app: web.Application, settings: ServerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, ssl_context=_ssl_context(settings))
        await site.start()
        log.info(
            "serving",
            listen=settings.listen,
            data_dir=str(settings.data_dir),
            tls=settings.tls_cert is not None,
        )
        await stop.wait()
        log.info("shutting_down")
    finally:
        await runner.cleanup()


def _ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise SettingsError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise SettingsError("TLS needs both --tls-cert and --tls-key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca is not None:
            context.load_verify_locations(cafile=settings.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as err:
        raise SettingsError(f"cannot load TLS files: {err}") from err
    return context


def _hash_password(args: argparse.Namespace) -> int:
    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("tofu-qemu: passwords differ", file=sys.stderr)
            return EXIT_USAGE
    if not password:
        print("tofu-qemu: empty password", file=sys.stderr)
        return EXIT_USAGE
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
