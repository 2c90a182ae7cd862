"""The aiohttp server: the Terraform http state backend and the read API over the spec store."""

from api.server.app import create_app

__all__ = ["create_app"]
