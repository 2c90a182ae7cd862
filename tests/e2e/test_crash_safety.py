"""The store survives `kill -9` of the server in the middle of a stream of state writes."""

from __future__ import annotations

import http.client
import json
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from api.settings import ServerSettings
from api.testing import tfstate as builders
from tests.e2e.conftest import SpawnServer
from tests.e2e.harness import ServerProcess

pytestmark = pytest.mark.e2e

MIN_ACKED_BEFORE_KILL = 3
KILL_WITHIN_SECONDS = 0.5
STREAM_DEADLINE_SECONDS = 20.0
VMS_PER_STATE = 5
# Retention keeps the newest `history_limit` versions; every acknowledged write among them must be kept.
HISTORY_LIMIT = int(ServerSettings.model_fields["history_limit"].default)


@dataclass
class WriteLog:
    """What the writer knows: the serials the server acknowledged, and the one in flight."""

    acked: list[int] = field(default_factory=list)
    in_flight: int | None = None
    stopped_by: str | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)


def _state(serial: int, rng: random.Random) -> bytes:
    """A valid state of 50-200 KB: a few VMs plus an output of random padding."""
    document: dict[str, Any] = builders.vm_state(
        serial, {f"vm-{index}": {"memory": 256 + serial} for index in range(VMS_PER_STATE)}
    )
    padding = rng.randbytes(rng.randrange(25_000, 100_000)).hex()
    document["outputs"] = {"padding": {"value": padding, "type": "string"}}
    return builders.encode(document)


def _stream_writes(server: ServerProcess, project: str, log: WriteLog, rng: random.Random) -> None:
    """POST states with serials 1, 2, 3... (no lock) until the server stops answering."""
    serial = 0
    while True:
        serial += 1
        body = _state(serial, rng)
        with log.changed:
            log.in_flight = serial
        try:
            answer = server.request("POST", f"/state/{project}", body=body, timeout=5.0)
        except (OSError, http.client.HTTPException) as err:
            with log.changed:
                log.stopped_by = repr(err)
                log.changed.notify_all()
            return
        with log.changed:
            if answer.status != 200:
                log.stopped_by = f"HTTP {answer.status}: {answer.body[:200]!r}"
                log.changed.notify_all()
                return
            log.acked.append(serial)
            log.in_flight = None
            log.changed.notify_all()


def _integrity_check(db_path: Path) -> list[str]:
    connection = sqlite3.connect(db_path)
    try:
        return [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]
    finally:
        connection.close()


def test_kill_9_mid_stream_keeps_every_acknowledged_write(spawn_server: SpawnServer, tmp_path: Path) -> None:
    """After kill -9 mid-stream the database is intact and has the last acknowledged or in-flight write."""
    seed = random.randrange(2**32)
    print(f"crash-safety seed: {seed}")
    rng = random.Random(seed)
    project = "crash"
    data_dir = tmp_path / "data"
    server = spawn_server(data_dir)
    log = WriteLog()
    writer = threading.Thread(target=_stream_writes, args=(server, project, log, rng), name="writer")
    writer.start()
    try:
        with log.changed:
            assert log.changed.wait_for(
                lambda: len(log.acked) >= MIN_ACKED_BEFORE_KILL or log.stopped_by is not None,
                timeout=STREAM_DEADLINE_SECONDS,
            ), "the writer made no progress"
            assert log.stopped_by is None, log.stopped_by
        time.sleep(rng.uniform(0, KILL_WITHIN_SECONDS))
    finally:
        server.kill()  # also stops the writer if an assertion above failed
        writer.join(timeout=STREAM_DEADLINE_SECONDS)
    assert not writer.is_alive()
    last_acked, in_flight = log.acked[-1], log.in_flight
    print(f"killed after {len(log.acked)} acknowledged writes; in flight: {in_flight}")

    assert _integrity_check(server.db_path) == ["ok"]
    restarted = spawn_server(data_dir)

    current = json.loads(restarted.request("GET", f"/state/{project}").body)
    assert current["serial"] in {last_acked, in_flight}, (last_acked, in_flight)
    assert restarted.project(project)["serial"] == current["serial"]
    versions = restarted.get_json(f"/api/v1/projects/{project}/states")["items"]
    kept = {version["serial"] for version in versions}
    assert set(log.acked[-(HISTORY_LIMIT - 1) :]) <= kept
