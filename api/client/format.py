"""Rendering API objects for a terminal, the way kubectl does. Pure: no I/O, no clock.

Tables are left-aligned columns separated by three spaces, headers in capitals, `<none>` for an
empty value; ages use kubectl's human durations ("45s", "5m30s", "3h", "2d5h").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from api.vm_columns import NONE, age, columns, condition, ports

__all__ = ["NONE", "age", "condition", "ports", "table", "vm_row", "vm_table"]
COLUMN_GAP = "   "
# ANSI SGR colours by phase, used only on a terminal (and never with NO_COLOR).
_PHASE_COLOURS = {
    "Running": "32",
    "Starting": "33",
    "Pending": "33",
    "Stopping": "33",
    "Paused": "33",
    "Stopped": "90",
    "CrashLoopBackOff": "31",
    "Failed": "31",
    "Invalid": "31",
}
VM_COLUMNS = tuple(column.header for column in columns(wide=False))
VM_WIDE_COLUMNS = tuple(column.header for column in columns(wide=True))


def vm_row(vm: Mapping[str, Any], now: datetime, *, wide: bool = False) -> list[str]:
    return [column.cell(vm, now) for column in columns(wide=wide)]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, colour_column: int | None = None) -> str:
    """Columns padded to their widest cell. `colour_column`: the phase column, to colour (the
    padding is computed on the plain text so colours never misalign the table)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for index, row in enumerate([list(headers), *rows]):
        cells = []
        for column, (cell, width) in enumerate(zip(row, widths, strict=True)):
            padded = cell.ljust(width) if column < len(widths) - 1 else cell
            if colour_column == column and index > 0:
                padded = paint(cell, _PHASE_COLOURS.get(cell)) + padded[len(cell) :]
            cells.append(padded)
        lines.append(COLUMN_GAP.join(cells).rstrip())
    return "\n".join(lines) + "\n"


def paint(text: str, sgr: str | None) -> str:
    return f"\x1b[{sgr}m{text}\x1b[0m" if sgr else text


def vm_table(
    vms: Sequence[Mapping[str, Any]], now: datetime, *, wide: bool = False, colour: bool = False
) -> str:
    headers = VM_WIDE_COLUMNS if wide else VM_COLUMNS
    rows = [vm_row(vm, now, wide=wide) for vm in vms]
    return table(headers, rows, colour_column=2 if colour else None)
