"""Typed application state (aiohttp AppKey), set up by the app factory."""

from __future__ import annotations

from aiohttp import web

from api.credentials import Credentials
from api.settings import ServerSettings
from api.store import Database, StateStore, VMStore

SETTINGS = web.AppKey("settings", ServerSettings)
CREDENTIALS = web.AppKey("credentials", Credentials)
DATABASE = web.AppKey("database", Database)
STATES = web.AppKey("states", StateStore)
VMS = web.AppKey("vms", VMStore)
