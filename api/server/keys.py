"""Typed application state (aiohttp AppKey), set up by the app factories."""

from __future__ import annotations

from aiohttp import web

from api.infra.credentials import Credentials
from api.infra.metrics import Metrics
from api.settings import ServerSettings
from api.store import Database, StateStore, VMStore

SETTINGS = web.AppKey("settings", ServerSettings)
CREDENTIALS = web.AppKey("credentials", Credentials)
# Paths served without credentials (api/server/auth.py public_paths).
PUBLIC_PATHS = web.AppKey("public_paths", frozenset[str])
DATABASE = web.AppKey("database", Database)
STATES = web.AppKey("states", StateStore)
VMS = web.AppKey("vms", VMStore)
METRICS = web.AppKey("metrics", Metrics)
