"""The hosts of a store shared by several controllers: list, cordon, uncordon, drain
(docs/multi-host.md). Authenticated like every API route."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import structlog
from aiohttp import web

from api.hosts import Demand, host_document, host_name_problem
from api.openapi import Op
from api.server.auth import principal_of
from api.server.errors import status_response
from api.server.keys import DATABASE
from api.store.hosts import Hosts

log = structlog.get_logger(__name__)

HOSTS = Op(
    "Hosts: Ready (lease running), cordoned, labels, capacity, what their VMs ask (allocated), "
    "VM count and lease renewal time ({items})",
    ok="The hosts, by name",
)


def host_action(effect: str) -> Op:
    return Op(effect, ok="The host as GET /api/v1/hosts shows it", errors=(400, 404, 503, 507))


CORDON = host_action("Cordon: the scheduler places no new VM on the host; its VMs stay")
UNCORDON = host_action("Uncordon: the host takes new VMs again")
DRAIN = Op(
    "Drain: cordon, and unplace the host's VMs that hold no data (no Retain disk) so the "
    "scheduler moves them; VMs with retained disks stay. `?force=true`: move every VM, "
    "retained disks left behind, and fence the host (epoch + 1)",
    ok="{host, moved: [uid], kept: [uid]}",
    errors=(400, 404, 503, 507),
    query=(
        {
            "name": "force",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": ["true", "false"], "default": "false"},
            "description": "true: also move the VMs with retained disks (their data stays on the host)",
        },
    ),
)


async def host_documents(hosts: Hosts, request: web.Request) -> dict[str, dict[str, Any]]:
    now = await request.app[DATABASE].database_now()
    placed: dict[str, list[Demand]] = defaultdict(list)
    for vm in await hosts.placed():
        if vm.host is not None:
            placed[vm.host].append(vm.demand)
    return {host.name: host_document(host, placed[host.name], now) for host in await hosts.all()}


async def list_hosts(request: web.Request) -> web.StreamResponse:
    hosts = Hosts(request.app[DATABASE])
    return web.json_response({"items": list((await host_documents(hosts, request)).values())})


def _host_name(request: web.Request) -> str | web.Response:
    name = request.match_info["host"]
    problem = host_name_problem(name)
    return status_response(400, f"host name {problem}") if problem else name


async def cordon(request: web.Request) -> web.StreamResponse:
    return await _set_cordoned(request, True)


async def uncordon(request: web.Request) -> web.StreamResponse:
    return await _set_cordoned(request, False)


async def _set_cordoned(request: web.Request, cordoned: bool) -> web.StreamResponse:
    name = _host_name(request)
    if isinstance(name, web.Response):
        return name
    hosts = Hosts(request.app[DATABASE])
    await hosts.set_cordoned(name, cordoned)
    log.info("host_cordoned" if cordoned else "host_uncordoned", host=name, by=principal_of(request))
    return web.json_response((await host_documents(hosts, request))[name])


async def drain(request: web.Request) -> web.StreamResponse:
    name = _host_name(request)
    if isinstance(name, web.Response):
        return name
    force = request.query.get("force", "false")
    if force not in ("true", "false"):
        return status_response(400, f"force must be true or false, not {force[:20]!r}")
    hosts = Hosts(request.app[DATABASE])
    moved, kept = await hosts.drain(name, force=force == "true")
    log.info(
        "host_drained",
        host=name,
        moved=len(moved),
        kept=len(kept),
        force=force == "true",
        by=principal_of(request),
    )
    return web.json_response(
        {"host": (await host_documents(hosts, request))[name], "moved": moved, "kept": kept}
    )
