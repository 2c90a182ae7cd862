"""Many clients racing for one project's lock against a real server process."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from api.testing import tfstate as builders
from tests.e2e.harness import HttpAnswer, ServerProcess

pytestmark = pytest.mark.e2e

CONTENDERS = 20
BARRIER_TIMEOUT = 10.0


def test_racing_locks_have_exactly_one_winner_and_lose_nothing(server: ServerProcess, project: str) -> None:
    """20 racing LOCKs: one 200, nineteen 423 naming the winner; the winner's write survives its UNLOCK."""
    lock_ids = [str(uuid.uuid4()) for _ in range(CONTENDERS)]
    start_line = threading.Barrier(CONTENDERS)

    def contend(lock_id: str) -> HttpAnswer:
        start_line.wait(timeout=BARRIER_TIMEOUT)
        return server.lock(project, lock_id)

    with ThreadPoolExecutor(max_workers=CONTENDERS) as pool:
        answers = dict(zip(lock_ids, pool.map(contend, lock_ids), strict=True))

    winners = [lock_id for lock_id, answer in answers.items() if answer.status == 200]
    assert len(winners) == 1, {lock_id: answer.status for lock_id, answer in answers.items()}
    winner = winners[0]
    losers = [answer for lock_id, answer in answers.items() if lock_id != winner]
    assert [answer.status for answer in losers] == [423] * (CONTENDERS - 1)
    assert {answer.json()["ID"] for answer in losers} == {winner}

    body = builders.encode(builders.vm_state(1, {"race": {}}))
    written = server.request("POST", f"/state/{project}?ID={winner}", body=body)
    assert written.status == 200, written.body
    assert server.unlock(project, winner).status == 200

    assert server.request("GET", f"/state/{project}").body == body
    info = server.project(project)
    assert (info["lock"], info["serial"], info["publishedSerial"]) == (None, 1, 1)
    assert server.vm(project, "race")["metadata"]["generation"] == 1
