"""The README's main command, as a new user runs it: a fresh clone, every default, nothing beside it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from api.store.db import DB_FILE_NAME
from tests.e2e.harness import REPO_ROOT, run_setup_step

pytestmark = pytest.mark.e2e

STAGES = (
    "venv (hack/setup)",
    "QEMU (hack/install-qemu)",
    "tiny guest (hack/build-guest)",
    "server ready on 127.0.0.1:8080",
    "init",
    "apply",
    "boot (the guest answers HTTP)",
    "destroy",
    "VM removed",
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed"
    return path


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        [_tool("git"), *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


def _fresh_clone(dest: Path) -> Path:
    """The commit under test, checked out alone: the same files a `git clone` of it gives. Fetching
    HEAD by itself also works in CI, where the checkout is often a shallow, detached commit."""
    head = _git("rev-parse", "HEAD", cwd=REPO_ROOT)
    dest.mkdir()
    _git("init", "--quiet", cwd=dest)
    _git("fetch", "--quiet", "--depth=1", str(REPO_ROOT), head, cwd=dest)
    _git("checkout", "--quiet", "--detach", "FETCH_HEAD", cwd=dest)
    assert _git("rev-parse", "HEAD", cwd=dest) == head
    return dest


def _new_user_env(tmp_path: Path) -> dict[str, str]:
    """This environment minus every TOFU_QEMU_* and TF_* variable and the test run's own venv; the
    CLI config named is missing, which makes Terraform warn unless the quick start uses its own."""
    venv_bin = str(REPO_ROOT / ".venv" / "bin")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TOFU_QEMU_", "TF_")) and key != "VIRTUAL_ENV"
    }
    env["PATH"] = os.pathsep.join(part for part in env.get("PATH", "").split(os.pathsep) if part != venv_bin)
    env["TF_CLI_CONFIG_FILE"] = str(tmp_path / "missing-terraformrc")
    return env


def _in_own_network_namespace(argv: list[str]) -> list[str]:
    """`argv` in a network namespace of its own, with only loopback up.

    The quick start must run on its default address, 127.0.0.1:8080, and forward VM ports from
    the default range; on a shared machine another server may hold any of them. In a namespace of
    its own every port is free, so the defaults are proven instead of worked around, and nothing
    can leave the machine. Creating it needs root, or an unprivileged user namespace.
    """
    as_root = [] if os.geteuid() == 0 else ["--map-root-user"]
    loopback_up = 'ip link set lo up && exec "$@"'
    return [_tool("unshare"), *as_root, "--net", "--", "sh", "-c", loopback_up, "sh", *argv]


def test_quickstart_from_a_fresh_clone_on_defaults(tmp_path: Path) -> None:
    """hack/quickstart in a clone with nothing beside it and no TOFU_QEMU_* variable: it serves on
    127.0.0.1:8080 with the data dir ./.tofu-qemu, boots the example VM, then destroys it."""
    clone = _fresh_clone(tmp_path / "tofu-qemu")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tofu-qemu"]
    env = _new_user_env(tmp_path)

    # The two stages that download run first, here, because the namespace below has no network.
    # hack/setup is the quick start's own first stage (it then finds the venv up to date; pip's
    # cache in ~/.cache makes this one affordable).
    setup = subprocess.run(
        [str(clone / "hack" / "setup")], cwd=clone, env=env, capture_output=True, text=True, timeout=900
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    # The guest build's only download is `apt-get download` of two .debs, skipped for .debs
    # already in .cache/guest/debs. The running checkout's are the versions the same apt lists
    # name, so the clone's hack/build-guest still does the whole build, from scratch, offline.
    run_setup_step("build-guest")
    shutil.copytree(REPO_ROOT / ".cache" / "guest" / "debs", clone / ".cache" / "guest" / "debs")

    result = subprocess.run(
        _in_own_network_namespace([str(clone / "hack" / "quickstart")]),
        cwd=clone,
        env={**env, "QUICKSTART_EXIT": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for stage in STAGES:
        assert re.search(rf"^  .*{re.escape(stage)} +\d+\.\d\d s$", result.stdout, re.MULTILINE), output
    log = (clone / ".tofu-qemu" / "quickstart.log").read_text()
    assert "build-guest: built " in log, "the clone's guest was not built"
    assert "quickstart/hello  phase=Running" in result.stdout, output
    assert "<h1>hello</h1>" in result.stdout, output
    assert "Destroyed" in result.stdout, output
    assert "Unable to open CLI configuration file" not in output + log
    # The server's default data dir, resolved in the clone, is the one that held the store.
    assert (clone / ".tofu-qemu" / DB_FILE_NAME).is_file()
    # Everything it wrote is ignored by git; the example's folder stays clean.
    assert _git("status", "--porcelain", "--ignored=no", cwd=clone) == ""
    assert not (clone / "examples" / "quickstart" / ".terraform").exists()
    shutil.rmtree(clone)  # a venv and a guest build: too big to leave behind for pytest's tmp dirs
