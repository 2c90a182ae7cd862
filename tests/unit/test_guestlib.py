"""hack/build-guest's modules live one folder deeper than the script did: their paths must still
name the repository, so the default cache stays .cache/guest/ (git-ignored) at its root."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_guest_builder_caches_under_the_repository_root() -> None:
    sys.path.insert(0, str(REPO_ROOT / "hack"))
    try:
        from guestlib.common import REPO
    finally:
        sys.path.remove(str(REPO_ROOT / "hack"))
    assert REPO == REPO_ROOT


def test_the_guest_scripts_parse_as_shell() -> None:
    """A script the guest cannot parse stops it at /init with a syntax error, long after the
    build: check the syntax here (POSIX sh; the guest's busybox ash reads the same)."""
    sys.path.insert(0, str(REPO_ROOT / "hack"))
    try:
        from guestlib import scripts
    finally:
        sys.path.remove(str(REPO_ROOT / "hack"))
    for name in ("INIT", "UDHCPC_SCRIPT"):
        checked = subprocess.run(
            [shutil.which("sh") or "/bin/sh", "-n"],
            input=getattr(scripts, name),
            text=True,
            capture_output=True,
            timeout=10,
            check=False,
        )
        assert checked.returncode == 0, f"{name}: {checked.stderr}"
