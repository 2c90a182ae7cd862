"""The client subcommands of `tofu-qemu`: get, describe, logs, restart, stop, start, states,
locks, force-unlock, usage. Each talks to a server over HTTP (api/client/connection.py) and
prints what kubectl would: tables by default, `-o json|yaml|wide|name`.

Exit status: 0 done, 1 the server refused or could not be reached (the message says which),
2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote

import yaml

from api.client import format as fmt
from api.client.connection import (
    REQUEST_TIMEOUT_SECONDS,
    ClientError,
    Connection,
    NotFoundError,
    connect,
)
from api.client.console import add_console_command
from api.client.describe import describe_vm
from api.client.hosts import HOST_RESOURCES, add_host_commands, get_hosts
from api.client.instancetypes import TYPE_WORDS, get_types
from api.client.snapshots import SNAPSHOT_RESOURCE_WORDS, add_snapshot_commands, get_snapshots
from api.client.usage import add_usage_command

API = "/apis/tofu-qemu.dev/v1alpha1"
VM_RESOURCES = ("vm", "vms", "qemuvm", "qemuvms", "qvm")
OUTPUTS = ("table", "wide", "json", "yaml", "name")
DEFAULT_TAIL_BYTES = 64 * 1024
EVENTS_SHOWN = 20
EXIT_FAILURE = 1
Clock = Callable[[], datetime]
GET_RESOURCES = (*VM_RESOURCES, *HOST_RESOURCES, *TYPE_WORDS, *SNAPSHOT_RESOURCE_WORDS)
GET_HELP = "vm, vms, qemuvm, qemuvms or qvm; hosts; instancetypes; preferences; snapshots; restores"


def add_client_commands(commands: Any) -> None:
    """Add the client subcommands to the `tofu-qemu` parser's subparsers."""
    get = _client_parser(commands, "get", "list VMs, hosts, instance types or preferences (kubectl get)")
    get.add_argument("resource", choices=GET_RESOURCES, metavar="vms", help=GET_HELP)
    get.add_argument("name", nargs="?", help="one VM or host (else all)")
    get.add_argument("-l", "--selector", help="label selector, e.g. tier=web,env!=prod")
    get.add_argument("-o", "--output", choices=OUTPUTS, default="table")
    get.add_argument("-w", "--watch", action="store_true", help="print changes as they happen")
    get.set_defaults(client=_get)
    describe = _client_parser(commands, "describe", "show a VM's spec, status, conditions and events")
    describe.add_argument("resource", choices=VM_RESOURCES, metavar="vm")
    describe.add_argument("name")
    describe.set_defaults(client=_describe)
    logs = _client_parser(commands, "logs", "show a VM's serial console")
    logs.add_argument("resource", choices=VM_RESOURCES, metavar="vm")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what the guest writes")
    logs.add_argument(
        "--tail-bytes", type=int, default=DEFAULT_TAIL_BYTES, help="start this far from the end"
    )
    logs.set_defaults(client=_logs)
    for action, help_text in (
        ("restart", "restart a VM gracefully (the spec is unchanged)"),
        ("stop", "stop a VM and keep it stopped until `start` (the spec is unchanged)"),
        ("start", "start a VM that `stop` stopped"),
        ("pause", "pause a VM's guest (QMP stop; QEMU keeps its memory) until `unpause`"),
        ("unpause", "continue a paused VM's guest (QMP cont)"),
        ("rollout", "move a VM to its instance type's and preference's current revisions"),
    ):
        parser = _client_parser(commands, action, help_text)
        parser.add_argument("resource", choices=VM_RESOURCES, metavar="vm")
        parser.add_argument("name")
        parser.set_defaults(client=_act, action=action)
    states = _client_parser(
        commands,
        "states",
        "list a project's kept state versions; `states purge PROJECT` removes the old ones",
        project=False,
    )
    states.add_argument("project", help="the project; or `purge`, followed by the project")
    states.add_argument("purged", nargs="?", metavar="PROJECT", help="with `purge`: the project to purge")
    states.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    states.add_argument(
        "--keep", type=int, default=0, help="with `purge`: keep this many of the newest old versions too"
    )
    states.set_defaults(client=_states)
    locks = _client_parser(commands, "locks", "list held state locks", project=False)
    locks.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    locks.set_defaults(client=_locks)
    unlock = _client_parser(commands, "force-unlock", "release a project's state lock", project=False)
    unlock.add_argument("project")
    unlock.add_argument("--id", help="only if the lock has this ID (as `terraform force-unlock ID` checks)")
    unlock.set_defaults(client=_force_unlock)
    add_usage_command(commands, _client_parser, _print_document)
    add_host_commands(commands, _client_parser)
    add_snapshot_commands(commands, _client_parser)


def add_console(commands: Any) -> None:
    """`console` (api/client/console.py), with this module's parser flags and VM lookup."""
    add_console_command(commands, _client_parser, _console_path)


def run_client(
    args: argparse.Namespace, *, env: Mapping[str, str] = os.environ, out: TextIO = sys.stdout
) -> int:
    """Run a client subcommand. :return: the exit status."""
    try:
        connection = connect(args.server, env, ca_file=args.certificate_authority, insecure=args.insecure)
        if getattr(args, "project", None) is None and "project" in vars(args):
            args.project = env.get("TOFU_QEMU_PROJECT") or None
        command: Callable[[Connection, argparse.Namespace, TextIO, Clock], None] = args.client
        command(connection, args, out, lambda: datetime.now(UTC))
    except ClientError as err:
        print(f"tofu-qemu: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return 0


def _client_parser(
    commands: Any, name: str, help_text: str, *, project: bool = True
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=help_text)
    parser.add_argument(
        "--server", help="the tofu-qemu server URL (env TOFU_QEMU_SERVER; default http://127.0.0.1:8080)"
    )
    parser.add_argument("--certificate-authority", metavar="FILE", help="CA bundle for an https server")
    parser.add_argument(
        "--insecure", action="store_true", help="do not verify the https server's certificate"
    )
    if project:
        parser.add_argument(
            "-p", "--project", help="the VM's project (env TOFU_QEMU_PROJECT; else found by name)"
        )
    parser.set_defaults(run=run_client)
    return parser


# ---- Commands ------------------------------------------------------------------------------


def _get(connection: Connection, args: argparse.Namespace, out: TextIO, now: Clock) -> None:
    if args.resource in TYPE_WORDS:
        get_types(connection, args, out)
        return
    if args.resource in SNAPSHOT_RESOURCE_WORDS:
        get_snapshots(connection, args, out, _print_document)
        return
    if args.resource in HOST_RESOURCES:
        get_hosts(connection, args, out, now(), _print_document)
        return
    if args.name is not None:
        vms = [_find_vm(connection, args.name, args.project)]
        resource_version = vms[0]["metadata"]["resourceVersion"]
    else:
        listing = connection.get_json(f"{API}/qemuvms", _filters(args))
        vms, resource_version = listing["items"], listing["metadata"]["resourceVersion"]
    if args.output in ("json", "yaml") and not args.watch:
        document = vms[0] if args.name is not None else _vm_list(vms, resource_version)
        _print_document(document, args.output, out)
        return
    colour = _colour(out)
    if args.output == "name":
        out.write("".join(f"qemuvm/{vm['metadata']['name']}\n" for vm in vms))
    elif args.output in ("table", "wide"):
        out.write(fmt.vm_table(vms, now(), wide=args.output == "wide", colour=colour) if vms else "")
        if not vms and not args.watch:
            print("No VMs found.", file=sys.stderr)
    out.flush()
    if args.watch:
        _watch(connection, args, resource_version, out, now)


def _watch(
    connection: Connection, args: argparse.Namespace, resource_version: str, out: TextIO, now: Clock
) -> None:
    params = {**_filters(args), "watch": "true", "resourceVersion": resource_version}
    for line in connection.stream_lines(f"{API}/qemuvms", params):
        if not line.strip():
            continue
        event = json.loads(line)
        vm = event.get("object", {})
        if event.get("type") not in ("ADDED", "MODIFIED", "DELETED"):
            continue  # BOOKMARK: only a resourceVersion
        if args.name is not None and vm.get("metadata", {}).get("name") != args.name:
            continue
        if args.output in ("json", "yaml"):
            _print_document(event, args.output, out)
        elif args.output == "name":
            out.write(f"qemuvm/{vm['metadata']['name']}\n")
        else:
            rows = fmt.vm_table([vm], now(), wide=args.output == "wide", colour=_colour(out))
            out.write(rows.splitlines(keepends=True)[1])
        out.flush()


def _describe(connection: Connection, args: argparse.Namespace, out: TextIO, now: Clock) -> None:
    vm = _find_vm(connection, args.name, args.project)
    events = connection.get_json(_vm_path(vm, "events"))["items"][-EVENTS_SHOWN:]
    out.write(describe_vm(vm, events, now()))


def _logs(connection: Connection, args: argparse.Namespace, out: TextIO, now: Clock) -> None:
    vm = _find_vm(connection, args.name, args.project)
    params = {"tailBytes": str(args.tail_bytes)}
    if args.follow:
        params["follow"] = "true"
    # Following, the console may stay quiet for hours: no read deadline then (as kubectl logs -f).
    timeout = None if args.follow else REQUEST_TIMEOUT_SECONDS
    for chunk in connection.stream_bytes(_vm_path(vm, "console"), params, timeout=timeout):
        out.write(chunk.decode(errors="replace"))
        out.flush()


def _act(connection: Connection, args: argparse.Namespace, out: TextIO, now: Clock) -> None:
    vm = _find_vm(connection, args.name, args.project)
    connection.post_json(_vm_path(vm, args.action))
    meta = vm["metadata"]
    out.write(f"qemuvm/{meta['name']} {args.action} requested (project {meta['project']})\n")


def _states(connection: Connection, args: argparse.Namespace, out: TextIO, now: Clock) -> None:
    if args.purged is not None:
        if args.project != "purge":
            raise ClientError(f"unexpected {args.purged!r}: use `states PROJECT` or `states purge PROJECT`")
        _purge_states(connection, args.purged, args.keep, out)
        return
    versions = connection.get_json(f"/api/v1/projects/{quote(args.project, safe='')}/states")["items"]
    if args.output != "table":
        _print_document({"items": versions}, args.output, out)
        return
    rows = [
        [
            str(v["serial"]),
            (v.get("lineage") or fmt.NONE)[:8],
            str(v["size"]),
            v.get("who") or fmt.NONE,
            v.get("operation") or fmt.NONE,
            fmt.age(v["createdAt"], now()),
        ]
        for v in versions
    ]
    out.write(fmt.table(("SERIAL", "LINEAGE", "BYTES", "WHO", "OPERATION", "AGE"), rows))


def _purge_states(connection: Connection, project: str, keep: int, out: TextIO) -> None:
    result = connection.post_json(f"{API}/projects/{quote(project, safe='')}/purge-states", {"keep": keep})
    out.write(
        f"project {project}: {result['removed']} old state version(s) removed, {result['kept']} kept "
        "(the current, the published and the --keep newest)\n"
    )


def _locks(connection: Connection, args: argparse.Namespace, out: TextIO, now: Clock) -> None:
    locks = connection.get_json(f"{API}/locks")["items"]
    if args.output != "table":
        _print_document({"items": locks}, args.output, out)
        return
    if not locks:
        print("No state is locked.", file=sys.stderr)
        return
    rows = [
        [
            lock["project"],
            lock.get("id") or fmt.NONE,
            lock.get("who") or fmt.NONE,
            lock.get("operation") or fmt.NONE,
            fmt.age(lock.get("created") or lock.get("lockedAt"), now()),
        ]
        for lock in locks
    ]
    out.write(fmt.table(("PROJECT", "ID", "WHO", "OPERATION", "AGE"), rows))


def _force_unlock(connection: Connection, args: argparse.Namespace, out: TextIO, now: Clock) -> None:
    body = {"id": args.id} if args.id else {}
    connection.post_json(f"{API}/projects/{quote(args.project, safe='')}/force-unlock", body)
    out.write(f"project {args.project}: lock released\n")


# ---- Helpers -------------------------------------------------------------------------------


def _find_vm(connection: Connection, name: str, project: str | None) -> dict[str, Any]:
    """The VM `name` in `project`, or in whichever single project has one of that name.

    :raise ClientError: none, or several projects have one and no project was given.
    """
    if project is not None:
        vm: dict[str, Any] = connection.get_json(
            f"{API}/projects/{quote(project, safe='')}/qemuvms/{quote(name, safe='')}"
        )
        return vm
    matches = [vm for vm in connection.get_json(f"{API}/qemuvms")["items"] if vm["metadata"]["name"] == name]
    if not matches:
        raise NotFoundError(404, f"no VM named {name!r} in any project")
    projects = sorted({vm["metadata"]["project"] for vm in matches})
    if len(projects) > 1:
        raise ClientError(f"VMs named {name!r} exist in projects {', '.join(projects)}: pass -p PROJECT")
    return matches[0]  # type: ignore[no-any-return]


def _vm_url(project: str, name: str) -> str:
    return f"{API}/projects/{quote(project, safe='')}/qemuvms/{quote(name, safe='')}"


def _console_path(connection: Connection, name: str, project: str | None) -> str:
    return _vm_path(_find_vm(connection, name, project), "console")


def _vm_path(vm: Mapping[str, Any], sub: str) -> str:
    return f"{_vm_url(vm['metadata']['project'], vm['metadata']['name'])}/{sub}"


def _filters(args: argparse.Namespace) -> dict[str, str]:
    filters = {}
    if getattr(args, "selector", None):
        filters["labelSelector"] = args.selector
    if args.project:
        filters["project"] = args.project
    return filters


def _vm_list(vms: Sequence[Mapping[str, Any]], resource_version: str) -> dict[str, Any]:
    return {
        "apiVersion": "tofu-qemu.dev/v1alpha1",
        "kind": "QemuVMList",
        "metadata": {"resourceVersion": resource_version},
        "items": list(vms),
    }


def _print_document(document: Any, output: str, out: TextIO) -> None:
    if output == "yaml":
        out.write(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
        out.write("---\n" if isinstance(document, dict) and "type" in document else "")
    else:
        out.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def _colour(out: TextIO) -> bool:
    """Colour on a terminal only, and never when NO_COLOR is set (https://no-color.org)."""
    return out.isatty() and not os.environ.get("NO_COLOR")
