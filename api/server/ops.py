"""The ops server of `tofu-qemu controller`: probes and metrics only, no state API.

Same handlers, error bodies and auth as the main app (api/server/app.py), so a scraper or a
probe sees one behaviour whichever process it asks.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from api.infra.credentials import Credentials
from api.infra.health import ReadinessCheck
from api.infra.metrics import Metrics
from api.server.auth import AUTHENTICATOR, Authenticator, auth_middleware, close_authenticator, public_paths
from api.server.connections import CONNECTION_GUARD, ConnectionGuard, ConnectionLimits
from api.server.errors import error_middleware
from api.server.health import READINESS_CHECKS, database_check_context
from api.server.hosts import allowed_host_names, host_middleware
from api.server.keys import CREDENTIALS, DATABASE, METRICS, PUBLIC_PATHS
from api.server.routes import OPS_ROUTES
from api.store import Database


def create_ops_app(
    *,
    metrics: Metrics,
    database: Database,
    credentials: Credentials,
    metrics_auth: bool = True,
    readiness_checks: Mapping[str, ReadinessCheck] | None = None,
    listen_host: str = "",
) -> web.Application:
    """Serve /healthz, /readyz and /metrics for `database`, which the caller owns, with the
    default connection limits and Host check (api/server/connections.py, hosts.py) for a
    listener on `listen_host`.

    /readyz checks that `database` is writable plus every check in `readiness_checks`; more
    may be added to app[READINESS_CHECKS] later. The store gauges of `database` are exported
    on `metrics` (api/store/metrics.py).
    """
    guard = ConnectionGuard(ConnectionLimits.of(), listener="ops", metrics=metrics)
    app = web.Application(
        middlewares=[
            guard.middleware(),
            error_middleware,
            host_middleware(allowed_host_names(listen_host, frozenset())),
            auth_middleware,
        ]
    )
    app[CONNECTION_GUARD] = guard
    install_ops(
        app,
        credentials=credentials,
        metrics=metrics,
        metrics_auth=metrics_auth,
        readiness_checks=readiness_checks,
    )
    app[DATABASE] = database
    app.add_routes(OPS_ROUTES)
    app.cleanup_ctx.append(database_check_context)
    return app


def install_ops(
    app: web.Application,
    *,
    credentials: Credentials,
    metrics: Metrics,
    metrics_auth: bool,
    readiness_checks: Mapping[str, ReadinessCheck] | None,
) -> None:
    """What auth, /metrics and /readyz read from an app, for both app factories. The store's
    own check and gauges come with `database_check_context`, once app[DATABASE] is set."""
    app[CREDENTIALS] = credentials
    app[AUTHENTICATOR] = Authenticator(credentials, metrics=metrics)
    app.on_cleanup.append(close_authenticator)
    app[PUBLIC_PATHS] = public_paths(metrics_auth=metrics_auth)
    app[METRICS] = metrics
    app[READINESS_CHECKS] = dict(readiness_checks or {})
