"""Links to a section of the docs (`docs/backend.md#locks`, `[x](#publishing)`) name a heading
that exists, so code comments and docs keep pointing at real text as the docs change."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = {".git", ".venv", ".cache", ".tofu-qemu", "node_modules", "__pycache__", ".mypy_cache"}
# docs/NAME.md#anchor anywhere; (NAME.md#anchor) and (#anchor) as Markdown links inside docs/.
ANYWHERE = re.compile(r"docs/([a-z0-9_-]+\.md)#([a-z0-9_-]+)")
IN_DOCS = re.compile(r"\]\(([a-z0-9_-]+\.md)?#([a-z0-9_-]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {slug(heading) for heading in HEADING.findall(doc.read_text(encoding="utf-8"))}


def tracked_text_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = [name for name in dirs if name not in SKIPPED_DIRS]
        for name in names:
            path = Path(folder) / name
            if path.suffix in {".py", ".md", ".toml", ".tf", ""} and path.stat().st_size < 1_000_000:
                files.append(path)
    return files


def test_slugs_follow_github() -> None:
    assert slug("Conflicts and `-lock-timeout`") == "conflicts-and--lock-timeout"
    assert slug("What the server never does") == "what-the-server-never-does"


def test_every_section_link_names_an_existing_heading() -> None:
    broken = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        links = [(REPO / "docs" / name, anchor) for name, anchor in ANYWHERE.findall(text)]
        if path.parent == REPO / "docs":
            links += [(path.parent / (name or path.name), anchor) for name, anchor in IN_DOCS.findall(text)]
        broken += [
            f"{path.relative_to(REPO)}: {doc.name}#{anchor}"
            for doc, anchor in links
            if not doc.is_file() or anchor not in anchors(doc)
        ]
    assert not broken, "links to missing sections:\n" + "\n".join(sorted(set(broken)))
