"""GET /metrics: the Prometheus text exposition of the app's Metrics registry.

The store-derived gauges are refreshed first, within STORE_REFRESH_TIMEOUT_SECONDS. When the
store does not answer in time the scrape still succeeds, with those gauges as last seen and
`tofu_qemu_store_metrics_refresh_errors_total` counting it: a busy store is exactly when the
controller's own metrics are wanted.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.infra.metrics import ScrapeRefreshed
from api.server.keys import METRICS
from api.store.sql import FAILURES

log = structlog.get_logger(__name__)
STORE_REFRESH_TIMEOUT_SECONDS = 5.0


async def metrics(request: web.Request) -> web.StreamResponse:
    registered = request.app[METRICS]
    if registered.store is not None:
        await _refresh(registered.store)
    # CONTENT_TYPE_LATEST carries a charset, which aiohttp's content_type argument refuses.
    return web.Response(
        body=generate_latest(registered.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _refresh(store: ScrapeRefreshed) -> None:
    try:
        async with asyncio.timeout(STORE_REFRESH_TIMEOUT_SECONDS):
            await store.refresh()
    except (TimeoutError, *FAILURES, ValueError) as err:
        store.refresh_errors_total.inc()
        log.warning("store_metrics_refresh_failed", error=f"{type(err).__name__}: {err}")
