"""`tofu-qemu get snapshots|restores` (docs/snapshots.md#the-cli): every project's QemuVMSnapshots
or QemuVMRestores (or those of `-p PROJECT`), as `kubectl get` would print them."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import quote

from api.client.connection import ClientError, Connection
from api.client.format import table

API = "/apis/tofu-qemu.dev/v1alpha1"
SNAPSHOT_WORDS = ("snapshots", "snapshot", "qemuvmsnapshots", "vmsnap")
RESTORE_WORDS = ("restores", "restore", "qemuvmrestores", "vmrestore")
SNAPSHOT_RESOURCE_WORDS = SNAPSHOT_WORDS + RESTORE_WORDS
VM_WORDS = ("vm", "vms", "qemuvm", "qemuvms", "qvm")
RESTORE_VM_COMMAND = "restore-vm"
PrintDocument = Callable[[Any, str, TextIO], None]


def get_snapshots(connection: Connection, args: argparse.Namespace, out: TextIO, show: PrintDocument) -> None:
    snapshots = args.resource in SNAPSHOT_WORDS
    plural = "qemuvmsnapshots" if snapshots else "qemuvmrestores"
    path = f"{API}/namespaces/{quote(args.project, safe='')}/{plural}" if args.project else f"{API}/{plural}"
    items = connection.get_json(path)["items"]
    if args.name is not None:
        items = [item for item in items if item["metadata"]["name"] == args.name]
    if args.output in ("json", "yaml"):
        show({"apiVersion": "v1", "kind": "List", "items": items}, args.output, out)
    elif args.output == "name":
        out.write("".join(f"{item['kind'].lower()}/{item['metadata']['name']}\n" for item in items))
    else:
        out.write(snapshot_table(items) if snapshots else restore_table(items))


def snapshot_table(items: Sequence[Mapping[str, Any]]) -> str:
    rows = [["PROJECT", "NAME", "SOURCE", "READYTOUSE", "CREATIONTIME", "INDICATIONS", "ERROR"]]
    for item in items:
        status = item["status"]
        rows.append(
            [
                item["metadata"]["namespace"],
                item["metadata"]["name"],
                str(item["spec"].get("source", {}).get("name", "<none>")),
                str(status["readyToUse"]).lower(),
                status["creationTime"] or "<none>",
                ",".join(status["indications"]) or "<none>",
                status["error"] or "<none>",
            ]
        )
    return table(rows[0], rows[1:])


def restore_table(items: Sequence[Mapping[str, Any]]) -> str:
    rows = [["PROJECT", "NAME", "TARGET", "SNAPSHOT", "COMPLETE", "RESTORETIME", "ERROR"]]
    for item in items:
        status, spec = item["status"], item["spec"]
        rows.append(
            [
                item["metadata"]["namespace"],
                item["metadata"]["name"],
                str(spec.get("target", {}).get("name", "<none>")),
                str(spec.get("snapshot", "<none>")),
                str(status["complete"]).lower(),
                status["restoreTime"] or "<none>",
                status["error"] or "<none>",
            ]
        )
    return table(rows[0], rows[1:])


def add_snapshot_commands(commands: Any, client_parser: Callable[..., argparse.ArgumentParser]) -> None:
    """`snapshot vm NAME SNAP`, `restore vm NAME --snapshot SNAP`, `delete snapshot|restore NAME`."""
    take = client_parser(commands, "snapshot", "take a snapshot of a VM's disks, once (a QemuVMSnapshot)")
    take.add_argument("resource", choices=VM_WORDS, metavar="vm")
    take.add_argument("name")
    take.add_argument("snapshot", help="the snapshot's name")
    take.set_defaults(client=_take)
    revert = client_parser(
        commands, RESTORE_VM_COMMAND, "restore a VM's disks to a snapshot, once (`restore vm NAME` too)"
    )
    revert.add_argument("resource", choices=VM_WORDS, metavar="vm")
    revert.add_argument("name")
    revert.add_argument("--snapshot", required=True, help="the snapshot to restore")
    revert.add_argument("--restore-name", help="the restore's name (default restore-EPOCHSECONDS)")
    revert.set_defaults(client=_restore)
    delete = client_parser(
        commands, "delete", "delete a snapshot (and its data) or a restore made by the CLI"
    )
    delete.add_argument("resource", choices=SNAPSHOT_RESOURCE_WORDS, metavar="snapshot|restore")
    delete.add_argument("name")
    delete.set_defaults(client=_delete)


def vm_restore_argv(argv: Sequence[str]) -> list[str]:
    """`tofu-qemu restore vm NAME ...` as `restore-vm vm NAME ...`: `tofu-qemu restore FILE`
    restores the store from a backup, and a VM is restored with the word `vm` after it."""
    if len(argv) >= 2 and argv[0] == "restore" and argv[1] in VM_WORDS:
        return [RESTORE_VM_COMMAND, *argv[1:]]
    return list(argv)


def _project(args: argparse.Namespace) -> str:
    if not args.project:
        raise ClientError("pass -p PROJECT (or set TOFU_QEMU_PROJECT)")
    return str(args.project)


def _vm_path(args: argparse.Namespace, verb: str) -> str:
    return f"{API}/projects/{quote(_project(args), safe='')}/qemuvms/{quote(args.name, safe='')}/{verb}"


def _take(connection: Connection, args: argparse.Namespace, out: TextIO, now: object) -> None:
    created = connection.post_json(_vm_path(args, "snapshot"), params={"snapshot": args.snapshot})
    out.write(f"qemuvmsnapshot/{created['metadata']['name']} requested (project {_project(args)})\n")


def _restore(connection: Connection, args: argparse.Namespace, out: TextIO, now: object) -> None:
    params = {"snapshot": args.snapshot} | ({"restore": args.restore_name} if args.restore_name else {})
    created = connection.post_json(_vm_path(args, "restore"), params=params)
    out.write(f"qemuvmrestore/{created['metadata']['name']} requested (project {_project(args)})\n")


def _delete(connection: Connection, args: argparse.Namespace, out: TextIO, now: object) -> None:
    plural = "snapshots" if args.resource in SNAPSHOT_WORDS else "restores"
    project = quote(_project(args), safe="")
    connection.delete_json(f"/api/v1/projects/{project}/{plural}/{quote(args.name, safe='')}")
    out.write(f"{plural.removesuffix('s')} {args.name} deleted (project {_project(args)})\n")
