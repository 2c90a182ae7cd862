"""`tofu-qemu get hosts`, `cordon HOST`, `uncordon HOST`, `drain HOST` (docs/multi-host.md)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TextIO
from urllib.parse import quote

from api.client import format as fmt
from api.client.connection import ClientError, Connection
from api.vm_columns import age

HOST_RESOURCES = ("host", "hosts", "node", "nodes")
HOSTS_PATH = "/api/v1/hosts"
HOST_COLUMNS = ("NAME", "STATUS", "VMS", "CPUS", "MEMORY(MiB)", "PORTS", "LEASE", "LABELS")
ClientParser = Callable[..., argparse.ArgumentParser]
Command = Callable[[Connection, argparse.Namespace, TextIO, Callable[[], datetime]], None]
PrintDocument = Callable[[Any, str, TextIO], None]


def add_host_commands(commands: Any, client_parser: ClientParser) -> None:
    for action, help_text in (
        ("cordon", "place no new VM on HOST (its VMs stay)"),
        ("uncordon", "let HOST take new VMs again"),
        (
            "drain",
            "cordon HOST and move its VMs that hold no data (no Retain disk) to other hosts",
        ),
    ):
        parser = client_parser(commands, action, help_text, project=False)
        parser.add_argument("host", metavar="HOST")
        if action == "drain":
            parser.add_argument(
                "--force",
                action="store_true",
                help="also move the VMs whose retained disks are on HOST: they start on another host "
                "with new disks; HOST is fenced (docs/multi-host.md)",
            )
        parser.set_defaults(client=_host_action, action=action, force=False)


def host_status(host: Mapping[str, Any]) -> str:
    """As kubectl shows nodes: Ready or NotReady, then SchedulingDisabled when cordoned."""
    status = "Ready" if host.get("ready") else "NotReady"
    return status + (",SchedulingDisabled" if host.get("cordoned") else "")


def host_row(host: Mapping[str, Any], now: datetime) -> list[str]:
    capacity, allocated = host.get("capacity", {}), host.get("allocated", {})

    def used(key: str) -> str:
        return f"{allocated.get(key, 0)}/{capacity.get(key, 0)}"

    labels = ",".join(f"{key}={value}" for key, value in sorted(host.get("labels", {}).items()))
    return [
        str(host.get("name", "")),
        host_status(host),
        str(host.get("vms", 0)),
        used("cpus"),
        used("memoryMiB"),
        used("ports"),
        age(host.get("leaseRenewedAt"), now),
        labels or "<none>",
    ]


def get_hosts(
    connection: Connection,
    args: argparse.Namespace,
    out: TextIO,
    now: datetime,
    print_document: PrintDocument,
) -> None:
    if args.watch:
        raise ClientError("`get hosts` cannot watch (hosts have no watch API yet): run it again")
    listing = connection.get_json(HOSTS_PATH)
    hosts = listing["items"]
    if args.name is not None:
        hosts = [host for host in hosts if host.get("name") == args.name]
    if args.output in ("json", "yaml"):
        print_document(listing if args.name is None else {"items": hosts}, args.output, out)
    elif args.output == "name":
        out.write("".join(f"host/{host['name']}\n" for host in hosts))
    elif hosts:
        out.write(fmt.table(HOST_COLUMNS, [host_row(host, now) for host in hosts]))
    else:
        out.write("No hosts found.\n")


def _host_action(
    connection: Connection, args: argparse.Namespace, out: TextIO, now: Callable[[], datetime]
) -> None:
    query = "?force=true" if args.force else ""
    answer = connection.post_json(f"{HOSTS_PATH}/{quote(args.host, safe='')}/{args.action}{query}")
    if args.action != "drain":
        out.write(f"host/{args.host} {args.action}ed\n")
        return
    forced = " (forced: the host is fenced)" if args.force else ""
    out.write(f"host/{args.host} drained{forced}: {len(answer['moved'])} VM(s) moved")
    kept = answer["kept"]
    out.write(
        f"; {len(kept)} kept because they retain disks here (drain --force moves them)\n" if kept else "\n"
    )
