"""The README's main command really sets up, serves and applies the example."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import REPO_ROOT, free_loopback_port

pytestmark = pytest.mark.e2e


def test_quickstart_boots_the_example_vm(tmp_path: Path) -> None:
    """hack/quickstart applies examples/quickstart, gets HTTP from the guest, then destroys it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TOFU_QEMU_", "TF_"))}
    env.update(
        TOFU_QEMU_LISTEN=f"127.0.0.1:{free_loopback_port()}",
        TOFU_QEMU_DATA_DIR=str(tmp_path / "data"),
        TOFU_QEMU_PORT_RANGE="29500-29599",
        TF_CLI_CONFIG_FILE=os.devnull,
        QUICKSTART_EXIT="1",
    )
    result = subprocess.run(
        [str(REPO_ROOT / "hack" / "quickstart")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "quickstart/hello  phase=Running" in result.stdout, result.stdout
    assert "<h1>hello</h1>" in result.stdout, result.stdout
    assert "Destroyed" in result.stdout, result.stdout
    assert not (REPO_ROOT / "examples" / "quickstart" / ".terraform").exists()
