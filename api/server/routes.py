"""Every route the servers answer, in one table: the ops routes, which the controller's own
small server answers too (api/server/ops.py), then the backend and the read API."""

from __future__ import annotations

from aiohttp import web

from api.server import backend, console, events, health, history, k8s, locks, metrics, resources
from api.server.auth import METRICS_PATH
from api.server.ui import UI_ROUTES

STATE = "/state/{project}"
LOCK = "/state/{project}/lock"
API = "/api/v1"
# The Kubernetes-style API (docs/api.md).
APIS = k8s.GROUP_VERSION
QEMUVM = f"{APIS}/projects/{{project}}/qemuvms/{{name}}"
OPENAPI_PATH = "/openapi.json"

OPS_ROUTES = [
    web.get("/healthz", health.healthz),
    web.get("/readyz", health.readyz),
    web.get(METRICS_PATH, metrics.metrics),
]
ROUTES = [
    *OPS_ROUTES,
    # Terraform/OpenTofu http backend (docs/backend.md#answers); PUT for update_method=PUT.
    web.get(STATE, backend.get_state, allow_head=False),
    web.post(STATE, backend.put_state),
    web.put(STATE, backend.put_state),
    web.delete(STATE, backend.delete_state),
    # LOCK/UNLOCK, and GitLab-style lock_method=POST / unlock_method=DELETE
    # (docs/backend.md#gitlab-style-configurations).
    web.route("LOCK", LOCK, backend.lock_state),
    web.post(LOCK, backend.lock_state),
    web.route("UNLOCK", LOCK, backend.unlock_state),
    web.delete(LOCK, backend.unlock_state),
    # Read API.
    web.get(f"{API}/projects", resources.list_projects),
    web.get(f"{API}/projects/{{project}}", resources.get_project),
    web.get(f"{API}/projects/{{project}}/states", resources.list_versions),
    web.get(f"{API}/projects/{{project}}/states/{{serial}}", resources.get_version),
    web.get(f"{API}/vms", resources.list_vms),
    web.get(f"{API}/projects/{{project}}/vms", resources.list_vms),
    web.get(f"{API}/projects/{{project}}/vms/{{name}}", resources.get_vm),
    web.get(f"{API}/disks", resources.list_disks),
    web.get(f"{API}/projects/{{project}}/disks", resources.list_disks),
    # Kubernetes-style API; `?watch=true` on the lists streams watch events.
    web.get(f"{APIS}/qemuvms", k8s.list_qemuvms),
    web.get(f"{APIS}/projects/{{project}}/qemuvms", k8s.list_qemuvms),
    web.get(QEMUVM, k8s.get_qemuvm),
    web.post(f"{QEMUVM}/restart", k8s.restart),
    web.post(f"{QEMUVM}/stop", k8s.stop),
    web.post(f"{QEMUVM}/start", k8s.start),
    web.get(f"{QEMUVM}/console", k8s.stream_errors(console.console)),
    web.get(f"{QEMUVM}/events", events.vm_events),
    web.get(f"{APIS}/projects/{{project}}/events", events.project_events),
    web.get(f"{APIS}/locks", locks.list_locks),
    web.post(f"{APIS}/projects/{{project}}/force-unlock", locks.force_unlock),
    web.post(f"{APIS}/projects/{{project}}/purge-states", history.purge_states),
    web.get(OPENAPI_PATH, k8s.openapi),
    *UI_ROUTES,
]
