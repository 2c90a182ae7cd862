"""The Kubernetes-style API against real processes and a real QEMU guest, in split mode
(`tofu-qemu api` + `tofu-qemu controller` on one data dir): the API's watch sees the
controller's status writes only through SQLite's data_version, and the controller obeys
stop/start/restart requested through the API process.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import pytest

from api.testing.tfstate import encode, vm_state
from api.testing.waiting import wait_until
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    HTTP_TIMEOUT,
    PASSWORD,
    USER,
    VmHost,
    basic_auth,
    is_running_current,
)

pytestmark = pytest.mark.e2e

PROJECT = "k8sapi"
APIS = "/apis/tofu-qemu.dev/v1alpha1"
VM = f"{APIS}/projects/{PROJECT}/qemuvms/web"
SPEC: dict[str, Any] = {
    "memory": 128,
    "accel": "tcg",
    "stopTimeout": 2,
    "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"},
}
BOOT_TIMEOUT = 60.0
# Longer than the server's 15 s heartbeat: a read that waits this long means the stream is dead.
STREAM_READ_TIMEOUT = 30.0


class WatchStream:
    """A watch read line by line over a plain HTTP connection; closed on exit."""

    def __init__(self, port: int, path: str) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=STREAM_READ_TIMEOUT)
        self._connection.request("GET", path, headers={"Authorization": basic_auth(USER, PASSWORD)})
        self._response = self._connection.getresponse()
        assert self._response.status == 200, self._response.read()
        assert self._response.getheader("Content-Type") == "application/json;stream=watch"
        self.seen: list[dict[str, Any]] = []

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._connection.close()

    def wait_for(
        self, accept: Callable[[dict[str, Any]], bool], *, timeout: float, what: str
    ) -> dict[str, Any]:
        """Read events until one is accepted; every event read is kept in `seen`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self._response.readline()
            assert line, "the watch ended"
            event: dict[str, Any] = json.loads(line)
            self.seen.append(event)
            if accept(event):
                return event
        raise AssertionError(f"watch: {what} not within {timeout:.0f} s; last: {self.seen[-3:]}")


def api_json(host: VmHost, method: str, path: str) -> Any:
    answer = host.request(method, path)
    assert answer.status == 200, answer.body
    return answer.json()


def running_vm(event: dict[str, Any]) -> bool:
    obj = event["object"]
    return (
        event["type"] in ("ADDED", "MODIFIED")
        and obj["metadata"].get("name") == "web"
        and is_running_current(obj)
    )


def test_watch_console_actions_and_events_with_a_real_guest(make_vm_host: MakeVmHost) -> None:
    """Watch a VM boot, read its console, then stop, start and restart it through the API, and
    find each step in the watch, the status and the event log."""
    host = make_vm_host()
    api = host.start("api")
    host.start("controller")
    listed = api_json(host, "GET", f"{APIS}/qemuvms?project={PROJECT}")
    assert (listed["kind"], listed["items"]) == ("QemuVMList", [])

    with WatchStream(
        host.port, f"{APIS}/qemuvms?watch=1&allowWatchBookmarks=true&project={PROJECT}&timeoutSeconds=600"
    ) as watch:
        watch.wait_for(lambda e: e["type"] == "BOOKMARK", timeout=HTTP_TIMEOUT, what="initial bookmark")
        answer = api.request("POST", f"/state/{PROJECT}", body=encode(vm_state(1, {"web": SPEC})))
        assert answer.status == 200, answer.body
        watch.wait_for(lambda e: e["type"] == "ADDED", timeout=HTTP_TIMEOUT, what="ADDED web")
        # Written by the controller process: seen through data_version polling.
        first = watch.wait_for(running_vm, timeout=BOOT_TIMEOUT, what="web Running")["object"]

        console = wait_until(
            lambda: _console_text(host) if "Linux version" in _console_text(host) else None,
            timeout=BOOT_TIMEOUT,
            what="the kernel banner on the console",
        )
        assert "Linux version" in console

        stopped = api_json(host, "POST", f"{VM}/stop")
        assert stopped["status"]["override"]["stopped"] is True
        assert stopped["status"]["override"]["requestedBy"] == USER
        assert (stopped["spec"], stopped["metadata"]["generation"]) == (
            first["spec"],
            first["metadata"]["generation"],
        )
        watch.wait_for(
            lambda e: e["object"]["status"]["phase"] == "Stopped" if e["type"] == "MODIFIED" else False,
            timeout=BOOT_TIMEOUT,
            what="web Stopped",
        )

        api_json(host, "POST", f"{VM}/start")
        started = watch.wait_for(running_vm, timeout=BOOT_TIMEOUT, what="web Running again")["object"]
        assert started["status"]["pid"] != first["status"]["pid"]

        restarts = started["status"]["restarts"]
        api_json(host, "POST", f"{VM}/restart")
        restarted = watch.wait_for(
            lambda e: running_vm(e) and e["object"]["status"]["restarts"] > restarts,
            timeout=BOOT_TIMEOUT,
            what="web restarted",
        )["object"]
        assert restarted["status"]["pid"] != started["status"]["pid"]
        assert restarted["metadata"]["generation"] == first["metadata"]["generation"]

    events = api_json(host, "GET", f"{VM}/events")
    reasons = [event["reason"] for event in events["items"]]
    for reason in ("StopRequested", "StartRequested", "RestartRequested"):
        assert reason in reasons
        [event] = [e for e in events["items"] if e["reason"] == reason]
        assert USER in event["message"]
    assert (
        reasons.index("StopRequested") < reasons.index("StartRequested") < reasons.index("RestartRequested")
    )


def _console_text(host: VmHost) -> str:
    answer = host.request("GET", f"{VM}/console?tailBytes=1048576")
    return answer.body.decode() if answer.status == 200 else ""
