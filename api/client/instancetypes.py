"""`tofu-qemu get instancetypes|preferences` (docs/instancetypes.md#the-cli): the cluster-wide
ones from the server's config and the namespaced ones of every project (or of `-p PROJECT`), in
one table with their scope, as `kubectl get` would print them."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import quote

import yaml

from api.client.connection import Connection
from api.client.format import table

API = "/apis/tofu-qemu.dev/v1alpha1"
# The words `get` takes, by the pair of plurals (namespaced, cluster-wide) they list.
INSTANCE_TYPE_WORDS = ("instancetypes", "instancetype", "qemuinstancetypes", "qit")
PREFERENCE_WORDS = ("preferences", "preference", "qemupreferences", "qpref")
TYPE_WORDS = INSTANCE_TYPE_WORDS + PREFERENCE_WORDS
CLUSTER = "<cluster>"


def get_types(connection: Connection, args: argparse.Namespace, out: TextIO) -> None:
    instance_types = args.resource in INSTANCE_TYPE_WORDS
    plurals = (
        ("qemuinstancetypes", "qemuclusterinstancetypes")
        if instance_types
        else ("qemupreferences", "qemuclusterpreferences")
    )
    namespaced = (
        f"{API}/namespaces/{quote(args.project, safe='')}/{plurals[0]}"
        if args.project
        else f"{API}/{plurals[0]}"
    )
    items = [*connection.get_json(f"{API}/{plurals[1]}")["items"], *connection.get_json(namespaced)["items"]]
    if args.name is not None:
        items = [item for item in items if item["metadata"]["name"] == args.name]
    if args.output in ("json", "yaml"):
        document = {"apiVersion": "v1", "kind": "List", "items": items}
        text = (
            yaml.safe_dump(document, sort_keys=False)
            if args.output == "yaml"
            else json.dumps(document, indent=2)
        )
        out.write(text if text.endswith("\n") else text + "\n")
    elif args.output == "name":
        out.write("".join(f"{item['kind'].lower()}/{item['metadata']['name']}\n" for item in items))
    else:
        out.write(type_table(items, instance_types=instance_types))


def type_table(items: Sequence[Mapping[str, Any]], *, instance_types: bool) -> str:
    header = ["SCOPE", "NAME", "CPUS", "MEMORY"] if instance_types else ["SCOPE", "NAME", "SETS"]
    rows = [[*header, "REVISION", "VALID"]]
    for item in items:
        spec, metadata = item.get("spec", {}), item["metadata"]
        if instance_types:
            what = [str(spec.get("cpus", "<none>")), f"{spec['memory']}Mi" if "memory" in spec else "<none>"]
        else:
            what = [",".join(sorted(spec)) or "<none>"]
        valid = item["status"]["conditions"][0]
        rows.append(
            [
                metadata.get("namespace", CLUSTER),
                metadata["name"],
                *what,
                item["status"]["revision"],
                valid["status"] if valid["status"] == "True" else f"False: {valid['message']}",
            ]
        )
    return table(rows[0], rows[1:])
