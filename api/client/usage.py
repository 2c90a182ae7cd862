"""`tofu-qemu usage PROJECT --since 7d [-o json|yaml]`: what a project's VMs used (docs/usage.md).

The table has one row per VM (by uid: a re-created VM is a new row) and a TOTAL row; `-o json`
prints the API's UsageReport as it came.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, TextIO
from urllib.parse import quote

from api.client import format as fmt
from api.client.connection import ClientError, Connection
from api.humanize import human_duration
from api.quantity import parse_seconds

DEFAULT_SINCE = "7d"
_DAYS = re.compile(r"(?P<days>[0-9]{1,4})d(?P<rest>.*)")
HEADERS = ("NAME", "UID", "CPU(s)", "MEM(MiB-h)", "UPTIME", "DISK(MiB)")
Clock = Callable[[], datetime]


def parse_since(text: str) -> timedelta:
    """A look-back such as "7d", "36h", "1d12h" or "90m". :raise ValueError: for a user."""
    match = _DAYS.fullmatch(text.strip())
    days, rest = (int(match["days"]), match["rest"]) if match else (0, text.strip())
    seconds = parse_seconds(rest) if rest else 0
    if days == 0 and seconds == 0:
        raise ValueError(f'--since {text[:40]!r} must be a positive duration such as "7d" or "12h"')
    return timedelta(days=days, seconds=seconds)


Printer = Callable[[Any, str, TextIO], None]


def add_usage_command(
    commands: Any, client_parser: Callable[..., argparse.ArgumentParser], print_document: Printer
) -> None:
    """Add `usage` to the subparsers; `print_document(doc, "json"|"yaml", out)` prints -o."""
    parser = client_parser(commands, "usage", "show what a project's VMs used", project=False)
    parser.add_argument("project")
    parser.add_argument(
        "--since", default=DEFAULT_SINCE, help="how far back: 7d, 36h, 1d12h, 90m (default 7d)"
    )
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    parser.set_defaults(client=functools.partial(_usage, print_document=print_document))


def _usage(
    connection: Connection, args: argparse.Namespace, out: TextIO, now: Clock, *, print_document: Printer
) -> None:
    try:
        since = parse_since(args.since)
    except ValueError as err:
        raise ClientError(str(err)) from None
    end = now()
    report = connection.get_json(
        f"/api/v1/projects/{quote(args.project, safe='')}/usage",
        {"from": (end - since).isoformat(), "to": end.isoformat(), "points": "false"},
    )
    if args.output != "table":
        print_document(report, args.output, out)
        return
    rows = [_row(vm["name"], vm["uid"][:8], vm["total"]) for vm in report["vms"]]
    rows.append(_row("TOTAL", "", report["total"]))
    out.write(fmt.table(HEADERS, rows))


def _row(name: str, uid: str, total: Mapping[str, Any]) -> list[str]:
    return [
        name,
        uid or fmt.NONE,
        f"{total['cpuSeconds']:.1f}",
        f"{total['memoryMibSeconds'] / 3600:.1f}",
        human_duration(timedelta(seconds=total["uptimeSeconds"])),
        f"{total['diskBytes'] / 2**20:.1f}",
    ]
