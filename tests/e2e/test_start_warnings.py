"""What `tofu-qemu api` says at start about unsafe setups (issue 15, Low): a password on the
command line, credentials over plain HTTP on a non-loopback address, and a bind failure as one
clear line instead of a traceback.

The server is pointed at 0.0.0.0 on a port this test holds on loopback, so it never listens
beyond loopback: its bind fails, which is the third thing checked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.e2e.harness import REPO_ROOT

START_TIMEOUT = 30.0


def test_unsafe_setups_are_warned_about_and_a_bind_failure_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {key: value for key, value in os.environ.items() if not key.startswith("TOFU_QEMU_")}
        env["TOFU_QEMU_LOG_FORMAT"] = "json"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "controller.cli",
                "api",
                "--data-dir",
                str(tmp_path / "data"),
                "--listen",
                f"0.0.0.0:{port}",
                "--users",
                "alice:s3cret",
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"tofu-qemu: cannot listen on 0.0.0.0:{port}: Address already in use"
    events = {entry["event"]: entry for entry in map(json.loads, lines[:-1])}
    secret = events["secret_on_command_line"]
    assert secret["level"] == "warning"
    assert secret["flag"] == "--users"
    assert "TOFU_QEMU_USERS or --users-file" in secret["message"]
    plain = events["credentials_over_plain_http"]
    assert plain["level"] == "warning"
    assert "--tls-cert" in plain["message"]
