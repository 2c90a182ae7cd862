"""The README's settings tables list every setting a `tofu-qemu serve` process reads, so a new
setting cannot go undocumented there."""

from __future__ import annotations

import re
from pathlib import Path

from controller.settings import ServeSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme_tables() -> None:
    rows = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])}
    missing = sorted(set(ServeSettings.model_fields) - named)
    assert not missing, f"settings missing from README.md's tables: {missing}"
