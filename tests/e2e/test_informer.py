"""A client-go style informer written with plain HTTP calls (list, then watch from the list's
resourceVersion, resume from the last version seen, relist on 410) stays in sync with a TLS
server through a restart, and through a restore of an older backup, which makes its version
newer than the store's: 410, relist, in sync again."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from api.testing.waiting import wait_until
from tests.e2e.harness import (
    REPO_ROOT,
    ServerProcess,
)
from tests.e2e.kube_support import TOKEN, tls_server
from tests.e2e.tls_support import Pki, client_context, pki

__all__ = ["pki"]  # fixtures
pytestmark = pytest.mark.e2e

LIST = "/apis/tofu-qemu.dev/v1alpha1/qemuvms"
SYNC_TIMEOUT = 30.0
# Longer than the server's 15 s bookmark heartbeat: a silent stream this long is dead.
READ_TIMEOUT = 30.0
RETRY_SECONDS = 0.2
CLI_TIMEOUT = 30.0


class Expired(Exception):
    """The server no longer has the informer's resourceVersion: relist."""


class Informer:
    """What client-go's reflector does, in miniature: a cache of (namespace, name) -> object."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self._port, self._context = port, context
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = ""
        self.relists = 0
        self.resumes = 0
        self.stopped = threading.Event()

    def _connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self._port, timeout=READ_TIMEOUT, context=self._context
        )

    def _get(
        self, connection: http.client.HTTPSConnection, query: dict[str, str]
    ) -> http.client.HTTPResponse:
        connection.request("GET", f"{LIST}?{urlencode(query)}", headers={"Authorization": f"Bearer {TOKEN}"})
        response = connection.getresponse()
        if response.status == 410:
            raise Expired(response.read().decode())
        assert response.status == 200, response.read()
        return response

    def relist(self) -> None:
        connection = self._connect()
        try:
            listed = json.load(self._get(connection, {}))
        finally:
            connection.close()
        self.cache = {_key(item): item for item in listed["items"]}
        self.version = listed["metadata"]["resourceVersion"]
        self.relists += 1

    def watch(self) -> None:
        """One watch from the cache's version, until the stream ends."""
        connection = self._connect()
        try:
            query = {"watch": "true", "resourceVersion": self.version, "allowWatchBookmarks": "true"}
            response = self._get(connection, query)
            self.resumes += 1
            while not self.stopped.is_set() and (line := response.readline()):
                self._apply(json.loads(line))
        finally:
            connection.close()

    def _apply(self, event: dict[str, Any]) -> None:
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Expired(obj["message"])
            raise AssertionError(f"watch error: {obj}")
        if kind in ("ADDED", "MODIFIED"):
            self.cache[_key(obj)] = obj
        elif kind == "DELETED":
            self.cache.pop(_key(obj), None)
        self.version = obj["metadata"]["resourceVersion"]

    def run(self) -> None:
        self.relist()
        while not self.stopped.is_set():
            try:
                self.watch()
            except Expired:
                self._retry(self.relist)
            except (OSError, http.client.HTTPException):
                # The server went away: resume from the last version once it is back.
                time.sleep(RETRY_SECONDS)

    def _retry(self, action: Any) -> None:
        while not self.stopped.is_set():
            try:
                action()
                return
            except (OSError, http.client.HTTPException):
                time.sleep(RETRY_SECONDS)

    def snapshot(self) -> dict[tuple[str, str], str]:
        return {key: obj["metadata"]["resourceVersion"] for key, obj in dict(self.cache).items()}


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def server_view(server: ServerProcess) -> dict[tuple[str, str], str]:
    return {_key(item): item["metadata"]["resourceVersion"] for item in server.get_json(LIST)["items"]}


def in_sync(informer: Informer, server: ServerProcess, what: str) -> None:
    wait_until(
        lambda: informer.snapshot() == server_view(server),
        timeout=SYNC_TIMEOUT,
        what=f"the informer in sync {what}",
        describe=lambda: f"informer {informer.snapshot()}\nserver   {server_view(server)}",
    )


def tofu_qemu(*args: str) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TOFU_QEMU_")}
    done = subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_an_informer_stays_in_sync_through_restarts_and_a_restore(pki: Pki, tmp_path: Path) -> None:
    server = tls_server(pki, tmp_path)
    informer = Informer(server.port, client_context(pki, with_certificate=False))
    thread = threading.Thread(target=informer.run, daemon=True)
    try:
        server.start()
        server.declare_vms("lab", 1, {"a": {}, "b": {}})
        tofu_qemu("backup", str(tmp_path / "backup.sqlite3"), "--data-dir", str(server.data_dir))
        thread.start()
        server.declare_vms("lab", 2, {"a": {"labels": {"v": "2"}}, "b": {}, "c": {}})
        in_sync(informer, server, "before the restart")
        assert informer.relists == 1

        server.stop()
        server.start()
        server.declare_vms("lab", 3, {"a": {}, "d": {}})
        server.declare_vms("edge", 1, {"e": {}})
        in_sync(informer, server, "after the restart")
        assert informer.relists == 1, "resumed from its version, no relist"
        assert informer.resumes >= 2

        server.stop()
        tofu_qemu("restore", str(tmp_path / "backup.sqlite3"), "--data-dir", str(server.data_dir), "--force")
        server.start()
        in_sync(informer, server, "after restoring an older backup")
        assert informer.relists == 2, "its version is newer than the restored store: 410, relist"
        assert set(informer.snapshot()) == {("lab", "a"), ("lab", "b")}
    finally:
        informer.stopped.set()
        server.kill()
        thread.join(timeout=READ_TIMEOUT + 5)
