"""Every route the servers answer, in one table: the ops routes, which the controller's own
small server answers too (api/server/ops.py), then the backend, the read API, the
Kubernetes-style API and what kubectl needs besides (docs/kubectl.md).

Each route carries its `Op` (api/openapi.py): the summary, the model it answers with, its
query parameters and errors. /openapi.json is generated from this table, so a route cannot be
served undocumented.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from api import openapi
from api.openapi import Op
from api.server import (
    backend,
    cluster,
    console,
    events,
    health,
    history,
    k8s,
    kube,
    locks,
    metrics,
    resources,
    snapshot_requests,
    usage,
)
from api.server import instancetypes as instancetype_routes
from api.server import snapshots as snapshot_routes
from api.server.auth import METRICS_PATH
from api.server.errors import Handler
from api.server.ui import UI_ROUTES

STATE = "/state/{project}"
LOCK = "/state/{project}/lock"
API = "/api/v1"
# The Kubernetes-style API (docs/api.md).
APIS = k8s.GROUP_VERSION
QEMUVM = f"{APIS}/projects/{{project}}/qemuvms/{{name}}"
# The same objects where Kubernetes clients look for them: a project is a namespace.
NAMESPACED = f"{APIS}/namespaces/{{project}}/qemuvms"
OPENAPI_PATH = "/openapi.json"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    doc: Op

    def definition(self) -> web.RouteDef:
        # GETs answer HEAD too, but the state: Terraform never sends it.
        if self.method == "GET":
            return web.get(self.path, self.handler, allow_head=self.path != STATE)
        return web.route(self.method, self.path, self.handler)


async def _openapi(request: web.Request) -> web.StreamResponse:
    """The OpenAPI 3.1 document of every route of this table."""
    return web.json_response(document())


def _get(path: str, handler: Handler, doc: Op) -> Route:
    return Route("GET", path, handler, doc)


OPS_TABLE = (
    _get("/healthz", health.healthz, openapi.HEALTHZ),
    _get("/readyz", health.readyz, openapi.READYZ),
    _get(METRICS_PATH, metrics.metrics, openapi.METRICS),
)
BACKEND_TABLE = (
    # Terraform/OpenTofu http backend (docs/backend.md#answers); PUT for update_method=PUT.
    _get(STATE, backend.get_state, openapi.STATE_READ),
    Route("POST", STATE, backend.put_state, openapi.STATE_WRITE),
    Route("PUT", STATE, backend.put_state, openapi.STATE_WRITE),
    Route("DELETE", STATE, backend.delete_state, openapi.STATE_DELETE),
    # LOCK/UNLOCK, and GitLab-style lock_method=POST / unlock_method=DELETE
    # (docs/backend.md#gitlab-style-configurations).
    Route("LOCK", LOCK, backend.lock_state, openapi.LOCK),
    Route("POST", LOCK, backend.lock_state, openapi.LOCK_POST),
    Route("UNLOCK", LOCK, backend.unlock_state, openapi.UNLOCK),
    Route("DELETE", LOCK, backend.unlock_state, openapi.LOCK_DELETE),
)
READ_API_TABLE = (
    _get(
        f"{API}/projects",
        resources.list_projects,
        openapi.read("Projects: serials, lock holder, spec problems"),
    ),
    _get(f"{API}/projects/{{project}}", resources.get_project, openapi.read("One project")),
    _get(f"{API}/projects/{{project}}/states", resources.list_versions, openapi.read("Kept state versions")),
    _get(
        f"{API}/projects/{{project}}/states/{{serial}}",
        resources.get_version,
        openapi.read("A kept state version, verbatim"),
    ),
    _get(
        f"{API}/vms",
        resources.list_vms,
        openapi.read("QemuVM objects of every project ({apiVersion: v1, kind: List, items})"),
    ),
    _get(f"{API}/projects/{{project}}/vms", resources.list_vms, openapi.read("QemuVM objects of a project")),
    _get(f"{API}/projects/{{project}}/vms/{{name}}", resources.get_vm, openapi.read("One QemuVM", "QemuVM")),
    _get(f"{API}/disks", resources.list_disks, openapi.read("Disk files held")),
    # Hosts of a store shared by several controllers (docs/multi-host.md).
    _get(f"{API}/hosts", cluster.list_hosts, cluster.HOSTS),
    Route("POST", f"{API}/hosts/{{host}}/cordon", cluster.cordon, cluster.CORDON),
    Route("POST", f"{API}/hosts/{{host}}/uncordon", cluster.uncordon, cluster.UNCORDON),
    Route("POST", f"{API}/hosts/{{host}}/drain", cluster.drain, cluster.DRAIN),
    _get(
        f"{API}/projects/{{project}}/disks",
        resources.list_disks,
        openapi.read("Disk files of a project's VMs"),
    ),
    _get(f"{API}/projects/{{project}}/usage", usage.project_usage, openapi.USAGE),
)
_ACTIONS = (
    ("restart", k8s.restart, "restart the running QEMU gracefully (counted in status.restarts), or start a "
     "crash-looping VM at once; lifts a stop"),
    ("stop", k8s.stop, "hold the VM stopped, whatever its runStrategy, until start"),
    ("start", k8s.start, "lift a stop: the spec's runStrategy applies again"),
    ("pause", k8s.pause, "pause the QEMU running now (QMP stop); a QEMU started later runs"),
    ("unpause", k8s.unpause, "continue a paused QEMU (QMP cont), whoever paused it"),
    ("rollout", k8s.rollout, "move the VM to its instance type's and preference's current revisions "
     "(a restart only if its effective spec changes)"),
)  # fmt: skip
K8S_TABLE = (
    # Kubernetes-style API; `?watch=true` on the lists streams watch events.
    _get(f"{APIS}/qemuvms", k8s.list_qemuvms, openapi.qemuvm_list("List or watch QemuVMs", scoped=False)),
    _get(
        f"{APIS}/projects/{{project}}/qemuvms",
        k8s.list_qemuvms,
        openapi.qemuvm_list("List or watch a project's QemuVMs", scoped=True),
    ),
    _get(QEMUVM, k8s.get_qemuvm, openapi.QEMUVM_GET),
    *(
        Route("POST", f"{QEMUVM}/{verb}", handler, openapi.action(verb, effect))
        for verb, handler, effect in _ACTIONS
    ),
    _get(f"{QEMUVM}/console", k8s.stream_errors(console.console), openapi.CONSOLE),
    _get(f"{QEMUVM}/events", events.vm_events, openapi.VM_EVENTS),
    _get(f"{APIS}/projects/{{project}}/events", events.project_events, openapi.PROJECT_EVENTS),
    _get(f"{APIS}/locks", locks.list_locks, openapi.LOCKS),
    Route("POST", f"{APIS}/projects/{{project}}/force-unlock", locks.force_unlock, openapi.FORCE_UNLOCK),
    Route("POST", f"{APIS}/projects/{{project}}/purge-states", history.purge_states, openapi.PURGE_STATES),
    _get(OPENAPI_PATH, _openapi, openapi.OPENAPI),
)
_K = openapi.kubernetes
# What kubectl and client-go need (docs/kubectl.md): discovery, namespaced paths, core/v1
# namespaces and events, OpenAPI v3, and a clear 405 for every write of a QemuVM.
KUBERNETES_TABLE = (
    _get("/version", kube.version, _K("Version (kubectl version): the Kubernetes API subset followed")),
    _get("/api", kube.api_versions, _K("APIVersions of the core group: v1")),
    _get(API, kube.core_resources, _K("APIResourceList of core/v1: namespaces and events, read-only")),
    _get("/apis", kube.api_groups, _K("APIGroupList: tofu-qemu.dev")),
    _get("/apis/tofu-qemu.dev", kube.api_group, _K("APIGroup tofu-qemu.dev")),
    _get(APIS, kube.qemuvm_resources, _K("APIResourceList: qemuvms (get, list, watch)")),
    _get(
        f"{API}/namespaces", kube.list_namespaces, _K("Projects as core/v1 Namespaces." + openapi.TABLE_NOTE)
    ),
    _get(
        f"{API}/namespaces/{{project}}",
        kube.get_namespace,
        _K("One project as a Namespace", errors=(400, 404)),
    ),
    _get(f"{API}/namespaces/{{project}}/events", kube.list_events, openapi.EVENTS_CORE),
    _get(
        NAMESPACED, k8s.list_qemuvms, openapi.qemuvm_list("List or watch a namespace's QemuVMs", scoped=True)
    ),
    _get(f"{NAMESPACED}/{{name}}", k8s.get_qemuvm, openapi.QEMUVM_GET),
    *(Route(method, NAMESPACED, kube.writes_refused, openapi.WRITE_REFUSED) for method in ("POST", "DELETE")),
    *(
        Route(method, f"{NAMESPACED}/{{name}}", kube.writes_refused, openapi.WRITE_REFUSED)
        for method in ("PUT", "PATCH", "DELETE")
    ),
    _get(kube.OPENAPI_V3_ROOT, kube.openapi_v3_index, _K("OpenAPI v3 discovery: the group's document URL")),
    _get(
        f"{kube.OPENAPI_V3_ROOT}/{kube.OPENAPI_V3_GROUP_PATH}",
        kube.openapi_v3_group,
        _K("OpenAPI v3 of tofu-qemu.dev/v1alpha1 (kubectl explain): the CRD's schema"),
    ),
    _get("/openapi/v2", kube.openapi_v2, openapi.OPENAPI_V2),
    # instancetypes: instance types and preferences beside qemuvms (docs/instancetypes.md#the-api).
    *(Route(*spec) for spec in instancetype_routes.route_specs()),
    # snapshots: QemuVMSnapshot and QemuVMRestore, read API and beside qemuvms (docs/snapshots.md).
    *(Route(*spec) for spec in snapshot_routes.route_specs()),
    *(Route(*spec) for spec in snapshot_requests.route_specs()),
)
API_TABLE: tuple[Route, ...] = (*OPS_TABLE, *BACKEND_TABLE, *READ_API_TABLE, *K8S_TABLE, *KUBERNETES_TABLE)

OPS_ROUTES = [route.definition() for route in OPS_TABLE]
ROUTES = [*(route.definition() for route in API_TABLE), *UI_ROUTES]


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document of API_TABLE (the dashboard's HTML pages are not an API)."""
    return openapi.build_document((route.method, route.path, route.doc) for route in API_TABLE)
