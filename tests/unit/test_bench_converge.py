"""hack/bench/converge's numbers: the bare baseline's QMP window that grows with N, the memory
cap that keeps N QEMUs under half of the machine, and the order the modes take turns in."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "hack" / "bench"


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, ModuleType]]:
    sys.path.insert(0, str(BENCH))
    try:
        import _common
        import _converge_rows
        import _memory_guard

        yield {"common": _common, "rows": _converge_rows, "guard": _memory_guard}
    finally:
        sys.path.remove(str(BENCH))


def test_the_bare_qmp_window_is_10_s_plus_a_fifth_of_a_second_per_vm(bench: dict[str, ModuleType]) -> None:
    window = bench["common"].qmp_connect_window
    assert [window(n) for n in (1, 10, 50, 200)] == pytest.approx([10.2, 12.0, 20.0, 50.0])


def test_a_count_whose_qemus_would_pass_the_12_gib_cap_is_refused_before_it_runs(
    bench: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = bench["guard"]
    assert guard.DEFAULT_MEMORY_CAP_GIB == 12.0
    monkeypatch.setattr(guard, "mem_available", lambda: 64 * guard.GIB)
    args = argparse.Namespace(rss_estimate=75, memory_floor=3.0, memory_cap=guard.DEFAULT_MEMORY_CAP_GIB)
    assert guard.memory_room(160, args) is None, "160 x 75 MiB = 11.7 GiB fits"
    refused = guard.memory_room(200, args)
    assert refused is not None
    assert "14.6 GiB of QEMUs" in refused
    assert "over the 12 GiB cap" in refused


def test_the_modes_take_turns_going_first_and_the_controller_opens(bench: dict[str, ModuleType]) -> None:
    order = bench["rows"].mode_order
    modes = ("controller", "bare", "baseline")
    firsts = [order(repeat, modes)[0] for repeat in range(4)]
    assert firsts == ["controller", "bare", "baseline", "controller"]
    assert order(1, ("controller", "bare")) == ("bare", "controller")
