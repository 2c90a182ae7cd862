"""The interactive console with real QEMU and the tiny guest's shell on ttyS0 (tofu.shell=1).

`tofu-qemu console vm NAME` runs on a real pseudo-terminal (os.openpty): it types a command the
guest's shell must evaluate (arithmetic, so the answer is not the echo of what was typed),
reads the answer back, detaches with Ctrl-], and leaves the terminal as it found it (also when
ended by SIGTERM). A second CLI attached meanwhile is a reader. The serial log keeps recording,
and attach/detach are events naming the user. One VM serves the whole module.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from tests.e2e.conftest import open_vm_host, report_host_on_failure
from tests.e2e.harness import (
    PASSWORD,
    REPO_ROOT,
    USER,
    ServerProcess,
    VmHost,
    is_running_current,
    run_setup_step,
)
from tests.e2e.test_dashboard import PageProblems, Screenshots, chromium

pytestmark = pytest.mark.e2e
__all__ = ["chromium"]  # a fixture

PROJECT = "console"
NAME = "shell"
SPEC = {
    "memory": 128,
    "accel": "tcg",
    "stopTimeout": 10,
    "boot": {
        "kernel": "tiny-guest/vmlinuz",
        "initrd": "tiny-guest/initramfs.cpio.gz",
        # no_timer_check: a vCPU starved by a busy host fails the kernel's IO-APIC timer check
        # and panics (as in test_firmware.py).
        "cmdline": "tofu.shell=1 no_timer_check",
    },
}
READY_MARKER = b"TOFU-GUEST-READY"
GUEST_TIMEOUT = 300.0  # an upper bound for a very busy machine; 5-10 s when idle
READ_TIMEOUT = 30.0
CTRL_RBRACKET = b"\x1d"
BROWSER_TIMEOUT_MS = 30_000


@dataclass(frozen=True, slots=True)
class ConsoleVM:
    host: VmHost
    server: ServerProcess
    serial_log: Path


@pytest.fixture(scope="module")
def console_vm(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    guest_images: Path,
    accel_cache: Path,
) -> Iterator[ConsoleVM]:
    run_setup_step("install-xterm")  # before the server starts: it reads its static files once
    host = open_vm_host(tmp_path_factory, guest_images, accel_cache)
    try:
        server = host.start("serve")
        server.declare_vms(PROJECT, 1, {NAME: SPEC})
        vm = host.wait_vm(PROJECT, NAME, is_running_current, what="shell VM Running")
        serial_log = host.data_dir / "run" / vm["metadata"]["uid"] / "serial.log"
        deadline = time.monotonic() + GUEST_TIMEOUT
        while READY_MARKER not in serial_log.read_bytes():
            assert time.monotonic() < deadline, f"the guest did not boot:\n{serial_log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield ConsoleVM(host, server, serial_log)
    finally:
        host.close()


@pytest.fixture(autouse=True)
def _report(request: pytest.FixtureRequest, console_vm: ConsoleVM) -> None:
    report_host_on_failure(request, console_vm.host)


class Terminal:
    """The CLI on a fresh pseudo-terminal, read and typed into as a person would."""

    def __init__(self, server: ServerProcess, *args: str) -> None:
        self.master, self.slave = os.openpty()
        self.cooked = termios.tcgetattr(self.slave)
        env = {
            **os.environ,
            "TOFU_QEMU_SERVER": f"http://127.0.0.1:{server.port}",
            "TOFU_QEMU_USERNAME": USER,
            "TOFU_QEMU_PASSWORD": PASSWORD,
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "console", "vm", NAME, "-p", PROJECT, *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            start_new_session=True,
        )
        self.seen = b""

    def read_until(self, marker: bytes, timeout: float = READ_TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{marker!r} not seen; the terminal shows:\n{self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                self.seen += os.read(self.master, 65536)
        return self.seen

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def is_raw(self) -> bool:
        lflag = termios.tcgetattr(self.slave)[3]
        return not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)

    def wait(self) -> int:
        return self.process.wait(timeout=READ_TIMEOUT)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        os.close(self.slave)


def console_events(server: ServerProcess) -> list[dict[str, str]]:
    path = f"/apis/tofu-qemu.dev/v1alpha1/projects/{PROJECT}/qemuvms/{NAME}/events"
    return [event for event in server.get_json(path)["items"] if event["reason"].startswith("Console")]


def wait_all_detached(server: ServerProcess) -> list[dict[str, str]]:
    """The server has let every session go (a client that left may be ahead of its detach), so
    that the next test's session is the writer."""
    deadline = time.monotonic() + READ_TIMEOUT
    while True:
        events = console_events(server)
        reasons = [event["reason"] for event in events]
        if reasons.count("ConsoleAttached") == reasons.count("ConsoleDetached"):
            return events
        assert time.monotonic() < deadline, f"sessions still attached: {events}"
        time.sleep(0.1)


def test_a_round_trip_from_the_cli(console_vm: ConsoleVM) -> None:
    terminal = Terminal(console_vm.server)
    reader: Terminal | None = None
    try:
        terminal.read_until(b"as writer")
        assert terminal.is_raw(), "the console puts the terminal in raw mode"
        reader = Terminal(console_vm.server)  # only now: the first to attach gets the input
        reader.read_until(b"as reader: another session holds the input")
        number = random.randrange(1000, 9999)
        terminal.type(f"echo hello-$(( {number} + 1 ))\r".encode())
        answer = f"hello-{number + 1}".encode()
        terminal.read_until(answer)
        reader.read_until(answer)  # readers see what the guest writes
        reader.type(b"echo from-the-reader\r")
        reader.read_until(b"read-only")
        terminal.type(CTRL_RBRACKET)
        assert terminal.wait() == 0
        terminal.read_until(b"Disconnected from VM shell: detached (^])")
        assert termios.tcgetattr(terminal.slave) == terminal.cooked, "the terminal is restored"
        assert answer in console_vm.serial_log.read_bytes(), "the log keeps recording"
        assert b"from-the-reader" not in console_vm.serial_log.read_bytes()
    finally:
        terminal.close()
        if reader is not None:
            reader.close()
    events = wait_all_detached(console_vm.server)
    messages = [event["message"] for event in events if event["reason"] == "ConsoleAttached"]
    assert f"{USER} attached to the serial console as writer" in messages
    assert any(
        event["reason"] == "ConsoleDetached" and event["message"].startswith(f"{USER} detached")
        for event in events
    )


def test_sigterm_restores_the_terminal(console_vm: ConsoleVM) -> None:
    terminal = Terminal(console_vm.server)
    try:
        terminal.read_until(b"as writer")
        assert terminal.is_raw()
        terminal.process.send_signal(signal.SIGTERM)
        assert terminal.wait() == 0
        terminal.read_until(b"signal SIGTERM")
        assert termios.tcgetattr(terminal.slave) == terminal.cooked
    finally:
        terminal.close()
    wait_all_detached(console_vm.server)


def test_a_round_trip_from_the_browser(console_vm: ConsoleVM, chromium: Browser) -> None:
    """The VM page's terminal (xterm.js, served by the server) connects, takes keys and shows
    the guest shell's answer; no script or console error on the way (CSP included)."""
    server = console_vm.server
    context = chromium.new_context(
        base_url=server.url,
        http_credentials={"username": USER, "password": PASSWORD},
        viewport={"width": 1280, "height": 1000},
    )
    try:
        page = context.new_page()
        problems = PageProblems(page)
        shots = Screenshots(page)
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(f"/ui/projects/{PROJECT}/vms/{NAME}")
        page.locator("#terminal-connect").click()
        status = page.locator("#terminal-status")
        expect(status).to_have_text(
            f"{USER} attached to the serial console as writer", timeout=BROWSER_TIMEOUT_MS
        )
        number = random.randrange(1000, 9999)
        page.locator("#terminal .xterm-helper-textarea").focus()
        page.keyboard.type(f"echo browser-$(( {number} * 2 ))")
        page.keyboard.press("Enter")
        rows = page.locator("#terminal .xterm-rows")
        expect(rows).to_contain_text(f"browser-{number * 2}", timeout=BROWSER_TIMEOUT_MS)
        shots.take("console-terminal")
        page.locator("#terminal-disconnect").click()
        expect(status).to_contain_text("Disconnected", timeout=BROWSER_TIMEOUT_MS)
        assert problems.errors == []
        origin = server.url.rstrip("/")
        assert all(url.startswith(origin) or url.startswith("ws://127.0.0.1") for url in requests), requests
        assert any(url.endswith("/ui/static/xterm.mjs") for url in requests)
    finally:
        context.close()
    assert f"browser-{number * 2}".encode() in console_vm.serial_log.read_bytes()
