"""The application factory: settings and credentials in, a ready aiohttp Application out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import timedelta

import structlog
from aiohttp import web

from api.infra.credentials import Credentials
from api.infra.health import ReadinessCheck
from api.infra.metrics import Metrics
from api.server.auth import auth_middleware
from api.server.connections import CONNECTION_GUARD, ConnectionGuard, ConnectionLimits, body_deadline
from api.server.console_ws import install_consoles
from api.server.errors import error_middleware
from api.server.health import database_check_context
from api.server.hosts import allowed_host_names, host_middleware
from api.server.keys import DATABASE, SETTINGS, STATES, VMS
from api.server.ops import install_ops
from api.server.origin import same_origin_middleware
from api.server.routes import ROUTES
from api.server.spans import span_name_middleware
from api.server.streams import install_streams
from api.settings import ServerSettings, parse_allowed_hosts
from api.store import Database, StateStore, StorageFull, StoreUnavailable, VMStore, open_store
from api.store.db import Clock, utc_now
from api.store.sql import FAILURES

log = structlog.get_logger(__name__)
STALE_LOCK_SCAN_MAX_SECONDS = 60.0


def create_app(
    settings: ServerSettings,
    *,
    credentials: Credentials,
    clock: Clock = utc_now,
    database: Database | None = None,
    metrics: Metrics | None = None,
    readiness_checks: Mapping[str, ReadinessCheck] | None = None,
) -> web.Application:
    """Build the server. Without `database` the app opens the store on startup and closes it
    on cleanup; with one (shared with the controller in `serve`) the caller owns it.

    `metrics` (shared with the controller in `serve`; a new one otherwise) is served on
    /metrics with the store's gauges. /readyz checks that the store is writable plus every
    check in `readiness_checks`; more may be added to app[READINESS_CHECKS] later.

    The app never prunes the event log: the process that holds the store does, once
    (controller/event_pruner.py).
    """
    metrics = metrics if metrics is not None else Metrics()
    limits = ConnectionLimits.of(settings)
    guard = ConnectionGuard(limits, listener="api", metrics=metrics)
    allowed_hosts = allowed_host_names(settings.host, parse_allowed_hosts(settings.allowed_hosts or ""))
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[
            guard.middleware(),
            span_name_middleware,
            error_middleware,
            host_middleware(allowed_hosts),
            auth_middleware,
            same_origin_middleware,
            body_deadline(limits.body_timeout),
        ],
    )
    app[SETTINGS] = settings
    app[CONNECTION_GUARD] = guard
    install_ops(
        app,
        credentials=credentials,
        metrics=metrics,
        metrics_auth=settings.metrics_auth,
        readiness_checks=readiness_checks,
    )
    app.add_routes(ROUTES)
    # Watches and console follows end at once on shutdown instead of holding it up.
    install_streams(app)
    install_consoles(app)

    app.cleanup_ctx.append(_store_context(settings, database, clock))
    app.cleanup_ctx.append(database_check_context)
    app.cleanup_ctx.append(_stale_lock_publisher)
    app.cleanup_ctx.append(_state_body_sweeper)
    return app


def _store_context(
    settings: ServerSettings, database: Database | None, clock: Clock
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The app's store for its lifetime: `database` if given (its caller owns it), else one the
    app opens on startup and closes on cleanup."""

    async def store_context(app: web.Application) -> AsyncIterator[None]:
        owned = database is None
        store = (
            await open_store(settings.data_dir, database_url=settings.database_url, clock=clock)
            if database is None
            else database
        )
        app[DATABASE] = store
        app[STATES] = StateStore(
            store, history_limit=settings.history_limit, strict_lineage=settings.strict_lineage
        )
        app[VMS] = VMStore(store)
        yield
        if owned:
            await store.close()

    return store_context


async def _stale_lock_publisher(app: web.Application) -> AsyncIterator[None]:
    """Own the background task that publishes states whose lock is held too long."""
    task = asyncio.create_task(_publish_stale_locks_forever(app), name="stale-lock-publisher")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _state_body_sweeper(app: web.Application) -> AsyncIterator[None]:
    """Own the background task that removes state body files no version names (api/store/state_bodies.py)."""
    task = asyncio.create_task(app[STATES].sweep_bodies_forever(), name="state-body-sweeper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _publish_stale_locks_forever(app: web.Application) -> None:
    max_age = app[SETTINGS].lock_publish_after
    interval = min(STALE_LOCK_SCAN_MAX_SECONDS, max_age / 4)
    while True:
        await asyncio.sleep(interval)
        try:
            published = await app[STATES].publish_stale_locks(timedelta(seconds=max_age))
        except StorageFull:
            log.warning("stale_lock_publish_failed", reason="storage_full")
            continue
        except StoreUnavailable:
            log.warning("stale_lock_publish_failed", reason="store_unavailable")
            continue
        except (*FAILURES, OSError) as err:  # a busy or broken store: the next scan tries again
            log.warning("stale_lock_publish_failed", reason="store_error", error=str(err))
            continue
        for project in published:
            log.warning("stale_lock_published", project=project, lock_age_limit_seconds=max_age)
