"""Which database URLs name a store: PostgreSQL's. Kept free of drivers so settings can use it."""

from __future__ import annotations

from urllib.parse import urlsplit

POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})


def check_database_url(url: str) -> str:
    """`url` if it names a PostgreSQL database. :raise ValueError: saying what is accepted."""
    if urlsplit(url).scheme not in POSTGRES_SCHEMES:
        # The URL itself is not repeated: it may carry a password.
        raise ValueError("the database URL must be postgresql://... (without one, SQLite in the data dir)")
    return url
