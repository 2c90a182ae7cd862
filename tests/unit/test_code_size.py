"""Size limits of the code outside tests: no file over 500 lines, no function over 60.

A long file or function is where the next change gets hard to review; the limits are the
style's (docs/architecture.md). Python under api/, controller/ and hack/ is measured: .py files
and the executables in hack/ whose first line runs python. A function counts from its first
decorator to its last line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MEASURED_TREES = ("api", "controller", "hack")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Offence:
    path: str
    what: str
    lines: int
    limit: int

    def __str__(self) -> str:
        return f"{self.path}: {self.what} has {self.lines} lines (limit {self.limit})"


def python_sources(root: Path) -> list[Path]:
    found = []
    for tree in MEASURED_TREES:
        for path in sorted((root / tree).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and is_python(path):
                found.append(path)
    return found


def is_python(path: Path) -> bool:
    if path.suffix == ".py":
        return True
    if path.suffix:
        return False
    with path.open("rb") as file:
        first = file.readline()
    return first.startswith(b"#!") and b"python" in first


def function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
    assert node.end_lineno is not None
    return node.end_lineno - first + 1


def offences_in(path: str, source: str) -> list[Offence]:
    found = []
    lines = len(source.splitlines())
    if lines > MAX_FILE_LINES:
        found.append(Offence(path, "the file", lines, MAX_FILE_LINES))
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = function_lines(node)
            if length > MAX_FUNCTION_LINES:
                found.append(
                    Offence(path, f"{node.name}() at line {node.lineno}", length, MAX_FUNCTION_LINES)
                )
    return found


def all_offences(root: Path) -> list[Offence]:
    found = []
    for path in python_sources(root):
        found.extend(offences_in(path.relative_to(root).as_posix(), path.read_text(encoding="utf-8")))
    return found


def test_no_file_or_function_is_over_its_limit() -> None:
    offences = [offence for offence in all_offences(REPO_ROOT)]
    assert not offences, "over the size limits:\n" + "\n".join(map(str, offences))


def test_the_walker_finds_long_files_and_functions_and_scripts(tmp_path: Path) -> None:
    """The measure itself: a long file, a decorated long function, a long method, a python
    executable without a suffix are all found; a shell script is not read as Python."""
    statements = [f"x{n} = {n}" for n in range(59)]
    function = ["@decorator", "def long():", *(f"    {line}" for line in statements)]
    method = [
        "class C:",
        "    async def m(self):",
        *(f"        {line}" for line in statements),
        "        pass",
    ]
    source = "\n".join([*function, "", *method]) + "\n"
    source += "\n" * (MAX_FILE_LINES - len(source.splitlines()) + 1)
    offences = offences_in("x.py", source)
    assert [offence.what for offence in offences] == ["the file", "long() at line 2", "m() at line 64"]
    assert [offence.lines for offence in offences] == [MAX_FILE_LINES + 1, 61, 61]
    hack = tmp_path / "hack"
    hack.mkdir()
    (hack / "tool").write_text("#!/usr/bin/env python3\n")
    (hack / "script").write_text("#!/usr/bin/env bash\n")
    assert [path.name for path in python_sources(tmp_path)] == ["tool"]
