"""Which project each queued uid belongs to: the work queue's fairness groups.

A VM never changes project, so each uid is looked up once, when a source first queues it, and
the lookup afterwards is a dict read (the queue asks synchronously). Keys with no object (an
orphan's runtime dir or ledger rows) share one group of their own.
"""

from __future__ import annotations

from collections.abc import Collection

from api.store import Database
from api.store.fleet import projects_of

# The group of keys whose object is gone (or not yet looked up).
NO_PROJECT = ""


class ProjectIndex:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._projects: dict[str, str] = {}

    def __call__(self, uid: str) -> str:
        return self._projects.get(uid, NO_PROJECT)

    async def learn(self, uids: Collection[str]) -> None:
        """Look up the projects of the uids not known yet (one read for all of them)."""
        unknown = [uid for uid in uids if uid not in self._projects]
        if unknown:
            self._projects.update(await projects_of(self._db, unknown))

    def keep_only(self, uids: Collection[str]) -> None:
        """Forget uids that are gone (a full resync knows every key), so the index stays small."""
        alive = set(uids)
        self._projects = {uid: project for uid, project in self._projects.items() if uid in alive}
