"""hack/build-guest's modules live one folder deeper than the script did: their paths must still
name the repository, so the default cache stays .cache/guest/ (git-ignored) at its root."""

from __future__ import annotations

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
