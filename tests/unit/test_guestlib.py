"""hack/build-guest's modules live one folder deeper than the script did: their paths must still
name the repository, so the default cache stays .cache/guest/ (git-ignored) at its root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_guest_builder_caches_under_the_repository_root() -> None:
    sys.path.insert(0, str(REPO_ROOT / "hack"))
    try:
        from guestlib.common import REPO
    finally:
        sys.path.remove(str(REPO_ROOT / "hack"))
    assert REPO == REPO_ROOT


@pytest.mark.parametrize("name", ["INIT", "UDHCPC_SCRIPT", "MARKER_CGI"])
def test_the_guest_scripts_parse(name: str) -> None:
    """`sh -n` of each script the guest runs: a syntax error there fails every boot, in /init."""
    sys.path.insert(0, str(REPO_ROOT / "hack"))
    try:
        from guestlib import scripts
    finally:
        sys.path.remove(str(REPO_ROOT / "hack"))
    text = getattr(scripts, name)
    checked = subprocess.run(
        ["/bin/sh", "-n"], input=text, capture_output=True, text=True, check=False, timeout=10
    )
    assert checked.returncode == 0, checked.stderr
