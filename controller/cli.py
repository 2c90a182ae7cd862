"""The `tofu-qemu` command: servers, store maintenance, and a kubectl-like client.

The composition root for the servers: it wires settings, store, HTTP server and controller
together. The client commands (get, describe, logs, ...) live in api/client/.

Flags are generated from the settings model, so every setting has a flag, an environment variable
and a config-file key of the same name (see api/settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import signal
import sqlite3
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from pydantic import BaseModel

from api.client.commands import add_client_commands, add_console
from api.client.kubeconfig import add_kubeconfig_command
from api.client.snapshots import vm_restore_argv
from api.infra.credentials import Credentials, CredentialsError, hash_password, load_credentials
from api.infra.logs import configure_logging
from api.infra.metrics import Metrics
from api.infra.settings import SettingsError, SettingsT, load_settings, split_listen
from api.infra.tracing import TracingConfigError, configure_tracing, shutdown_tracing
from api.server import create_app
from api.server.connections import CONNECTION_GUARD, GuardedSite, raise_open_file_limit
from api.server.ops import create_ops_app
from api.server.spans import instrument_http_server
from api.settings import ServerSettings
from api.store import StoreUnavailable, open_store
from api.store.backup import Refused, back_up, hold_data_dir, restore
from api.store.db import DB_FILE_NAME, utc_now
from api.store.files import PRIVATE_DIR_MODE, PRIVATE_UMASK, UnsafeDataDir, secure_data_dir
from controller.event_pruner import prune_events_until
from controller.layout import DataLayout
from controller.manager import Controller
from controller.settings import ControllerSettings, ServeSettings

log = structlog.get_logger("tofu_qemu")
EXIT_FAILURE = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # snapshots: `restore vm NAME --snapshot SNAP` is `restore-vm`; `restore FILE` is the store's.
    args = parser.parse_args(vm_restore_argv(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.run(args))
    except (SettingsError, CredentialsError, Refused) as err:
        print(f"tofu-qemu: {err}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tofu-qemu", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the state backend, the API and the controller")
    _add_settings_flags(serve, ServeSettings)
    serve.set_defaults(run=_serve, model=ServeSettings, with_api=True, with_controller=True)
    api_only = commands.add_parser("api", help="run only the state backend and API")
    _add_settings_flags(api_only, ServerSettings)
    api_only.set_defaults(run=_serve, model=ServerSettings, with_api=True, with_controller=False)
    controller = commands.add_parser("controller", help="run only the controller, against the same data dir")
    _add_settings_flags(controller, ControllerSettings)
    controller.set_defaults(run=_serve, model=ControllerSettings, with_api=False, with_controller=True)
    hasher = commands.add_parser("hash-password", help="print a salted hash for a users file")
    hasher.add_argument("--stdin", action="store_true", help="read the password from standard input")
    hasher.set_defaults(run=_hash_password)
    backup = commands.add_parser("backup", help="copy the store to FILE, consistently, even while it serves")
    _add_store_file_flags(backup, force_help="replace FILE if it exists")
    backup.set_defaults(run=_backup)
    restorer = commands.add_parser(
        "restore", help="replace the store with the backup FILE (stop servers first)"
    )
    _add_store_file_flags(
        restorer, force_help=f"replace an existing store (it is kept as {DB_FILE_NAME}.before-restore-TIME)"
    )
    restorer.set_defaults(run=_restore)
    add_client_commands(commands)
    add_console(commands)
    add_kubeconfig_command(commands)
    return parser


def _add_settings_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (also $TOFU_QEMU_CONFIG)")
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default
        help_text = f"{field.description or ''} (env TOFU_QEMU_{name.upper()}; default {default!s})"
        if field.annotation is bool:
            # --flag / --no-flag: a setting that defaults to true (metrics_auth) can be turned off.
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)


def _settings_from(args: argparse.Namespace, model: type[SettingsT]) -> SettingsT:
    flags: dict[str, Any] = {name: getattr(args, name, None) for name in model.model_fields}
    return load_settings(model, flags=flags, env=os.environ, config_file=args.config)


@dataclass(frozen=True, slots=True)
class _HttpSetup:
    credentials: Credentials
    ssl_context: ssl.SSLContext | None


class ListenFailed(Exception):
    """A listener could not bind its address; the message says which and why."""


def _serve(args: argparse.Namespace) -> int:
    settings = _settings_from(args, args.model)
    host_name = settings.resolved_host_name if isinstance(settings, ControllerSettings) else None
    configure_logging(settings.log_format, settings.log_level, host_name=host_name)
    _check_data_dir(settings.data_dir)
    _warn_about_secrets_in_argv(args)
    log.info("open_file_limit", soft=raise_open_file_limit())
    http = _http_setup(settings) if isinstance(settings, ServerSettings) else None
    try:
        tracer_provider = configure_tracing(
            otlp_endpoint=settings.otlp_endpoint,
            host_name=host_name,
        )
    except TracingConfigError as err:
        raise SettingsError(str(err)) from err
    if http is not None:
        # Puts the server span of every request around our handlers (web.Application is
        # replaced by an instrumented subclass for this process).
        instrument_http_server(tracer_provider)
    try:
        # Held for the whole life of the process so that `tofu-qemu restore` can tell it is running.
        with hold_data_dir(settings.data_dir, exclusive=False):
            asyncio.run(_run(settings, http))
    except ExceptionGroup as group:
        failed = _listen_failure(group)
        if failed is None:
            raise
        print(f"tofu-qemu: {failed}", file=sys.stderr)
        return EXIT_FAILURE
    except StoreUnavailable as err:
        print(f"tofu-qemu: {err}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        shutdown_tracing(tracer_provider)
    return 0


def _listen_failure(group: BaseExceptionGroup[BaseException]) -> ListenFailed | None:
    for error in group.exceptions:
        if isinstance(error, ListenFailed):
            return error
        if isinstance(error, BaseExceptionGroup):
            found = _listen_failure(error)
            if found is not None:
                return found
    return None


def _warn_about_secrets_in_argv(args: argparse.Namespace) -> None:
    """Flags are visible to every local user (ps, /proc/PID/cmdline): secrets belong elsewhere."""
    for flag, elsewhere in (("users", "TOFU_QEMU_USERS or --users-file"), ("tokens", "TOFU_QEMU_TOKENS")):
        if getattr(args, flag, None) is not None:
            log.warning(
                "secret_on_command_line",
                flag=f"--{flag}",
                message=f"--{flag} is visible to every local user in ps; use {elsewhere} instead",
            )


def _check_data_dir(data_dir: Path) -> None:
    """Make what this process creates private, and check the data dir (api/store/files.py).

    :raise SettingsError: the data dir cannot be made or written by this user (a volume owned by
    another uid is the usual cause in a container), or other users may write in it.
    """
    os.umask(PRIVATE_UMASK)
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    except OSError as err:
        raise SettingsError(f"cannot create the data dir {data_dir}: {err.strerror}") from err
    if not os.access(data_dir, os.R_OK | os.W_OK | os.X_OK):
        raise SettingsError(
            f"the data dir {data_dir} is not writable by uid {os.getuid()}: chown it to that user "
            "(in a container: the volume's owner must match the image's user)"
        )
    try:
        secure_data_dir(data_dir)
    except (UnsafeDataDir, OSError) as err:
        raise SettingsError(str(err)) from err


def _http_setup(settings: ServerSettings) -> _HttpSetup:
    """Credentials and TLS, checked before anything starts. :raise SettingsError: unsafe or broken."""
    credentials = load_credentials(
        users=settings.users, tokens=settings.tokens, users_file=settings.users_file
    )
    if not credentials.enabled and not settings.tls_client_cert_users:
        if not settings.is_loopback and not settings.insecure_no_auth:
            raise SettingsError(
                f"refusing to serve {settings.listen} without authentication: set TOFU_QEMU_USERS, "
                "TOFU_QEMU_TOKENS or --users-file, or pass --insecure-no-auth"
            )
        log.warning("auth_disabled", listen=settings.listen)
    ssl_context = _ssl_context(settings)
    if credentials.enabled and ssl_context is None and not settings.is_loopback:
        log.warning(
            "credentials_over_plain_http",
            listen=settings.listen,
            message="passwords and tokens cross the network in clear text: set --tls-cert and "
            "--tls-key, or serve behind a TLS proxy on loopback",
        )
    return _HttpSetup(credentials, ssl_context)


async def _run(
    settings: ServerSettings | ControllerSettings, http: _HttpSetup | None, stop: asyncio.Event | None = None
) -> None:
    """Run the HTTP server and/or the controller on one store, and the store's one event pruner,
    until SIGINT or SIGTERM (or, for tests, until `stop` is set)."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    database = await open_store(settings.data_dir, database_url=settings.database_url)
    metrics = Metrics()
    controller = (
        Controller(settings, database, metrics=metrics) if isinstance(settings, ControllerSettings) else None
    )
    checks = controller.readiness_checks() if controller is not None else {}
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(prune_events_until(stop, database, settings, metrics), name="events-prune")
            if isinstance(settings, ServerSettings) and http is not None:
                app = create_app(
                    settings,
                    credentials=http.credentials,
                    database=database,
                    metrics=metrics,
                    readiness_checks=checks,
                )
                tasks.create_task(
                    _serve_http(app, settings.host, settings.port, http.ssl_context, stop), name="http"
                )
            elif isinstance(settings, ControllerSettings):
                # The controller alone serves only probes and metrics, without auth: bind it to
                # loopback or a private network.
                ops = create_ops_app(
                    metrics=metrics,
                    database=database,
                    credentials=Credentials(),
                    metrics_auth=False,
                    readiness_checks=checks,
                    listen_host=split_listen(settings.ops_listen)[0],
                )
                host, port = split_listen(settings.ops_listen)
                tasks.create_task(_serve_http(ops, host, port, None, stop), name="ops")
            if controller is not None:
                tasks.create_task(controller.run(stop), name="controller")
    finally:
        await database.close()


async def _serve_http(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None, stop: asyncio.Event
) -> None:
    guard = app[CONNECTION_GUARD]
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, keepalive_timeout=guard.limits.keepalive_timeout
    )
    await runner.setup()
    try:
        site = GuardedSite(runner, host, port, guard=guard, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise ListenFailed(f"cannot listen on {host}:{port}: {reason}") from None
        log.info("serving", listen=f"{host}:{port}", tls=ssl_context is not None, max_connections=guard.cap)
        await stop.wait()
        log.info("shutting_down")
    finally:
        await runner.cleanup()


def _ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    if settings.tls_client_cert_users and settings.tls_client_ca is None:
        raise SettingsError("tls_client_cert_users needs --tls-client-ca: it says which certificates log in")
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


def _add_store_file_flags(parser: argparse.ArgumentParser, *, force_help: str) -> None:
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.add_argument("--config", type=Path, help="TOML config file (also $TOFU_QEMU_CONFIG)")
    data_dir = ServeSettings.model_fields["data_dir"]
    parser.add_argument(
        "--data-dir",
        dest="data_dir",
        default=None,
        help=f"{data_dir.description} (env TOFU_QEMU_DATA_DIR; default {data_dir.default!s})",
    )
    parser.add_argument("--force", action="store_true", help=force_help)
    parser.add_argument(
        "--database-url",
        dest="database_url",
        default=None,
        help="refused: a PostgreSQL store is backed up with pg_dump (env TOFU_QEMU_DATABASE_URL)",
    )


def _store_file_settings(args: argparse.Namespace) -> ServeSettings:
    # A backup holds every state, as the store does: nothing this command creates is for others.
    os.umask(PRIVATE_UMASK)
    # ServeSettings holds every command's settings, so a config file written for serve, api or
    # controller is accepted here too (unknown keys are errors); only data_dir is used.
    return _settings_from(args, ServeSettings)


def _backup(args: argparse.Namespace) -> int:
    settings = _store_file_settings(args)
    _refuse_postgres(settings, "backup")
    try:
        result = back_up(settings.data_dir, args.file, force=args.force)
    except (OSError, sqlite3.Error) as err:
        print(f"tofu-qemu: backup failed: {err}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(result.summary()))
    return 0


def _restore(args: argparse.Namespace) -> int:
    settings = _store_file_settings(args)
    _refuse_postgres(settings, "restore")
    _check_data_dir(settings.data_dir)
    try:
        restored = restore(args.file, settings.data_dir, force=args.force, now=utc_now())
    except (OSError, sqlite3.Error) as err:
        print(f"tofu-qemu: restore failed: {err}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(restored.summary()))
    _warn_about_orphans(settings, restored.backup.contents.vm_uids, previous=restored.previous)
    return 0


def _refuse_postgres(settings: ServeSettings, command: str) -> None:
    """:raise Refused: the store is on PostgreSQL, whose own tools do this job better."""
    if settings.database_url is not None:
        tool = "pg_dump --format=custom" if command == "backup" else "pg_restore --clean --if-exists"
        raise Refused(
            f"`tofu-qemu {command}` copies the SQLite store; this store is on PostgreSQL "
            f"(--database-url): use {tool} against that database instead (docs/postgres.md)"
        )


def _warn_about_orphans(settings: ServeSettings, uids: frozenset[str], *, previous: Path | None) -> None:
    """Name the VMs that run here but that the restored store does not know: the next start stops
    them, as it stops any orphan (docs/controller.md). An older backup is the usual cause."""
    layout = DataLayout(settings.data_dir, settings.resolved_images_dir)
    orphans = sorted(layout.runtime_uids() - uids)
    if not orphans:
        return
    undo = f"; to undo, restore {previous} before starting" if previous is not None else ""
    print(
        f"tofu-qemu: warning: the next start stops {len(orphans)} VM(s) that the backup does not "
        f"declare (runtime dirs in {layout.run_root}: {', '.join(orphans)}){undo}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
