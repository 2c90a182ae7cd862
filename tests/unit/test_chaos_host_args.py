"""hack/chaos's command line for host faults: what it accepts, and what it refuses with exit 2
before anything is started. The faults themselves run against real processes (docs/chaos.md)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

CHAOS = Path(__file__).resolve().parents[2] / "hack" / "chaos"


@pytest.fixture(scope="module")
def chaos() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("hack_chaos", str(CHAOS))
    spec = importlib.util.spec_from_loader("hack_chaos", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_host_faults_are_parsed_in_order(chaos: ModuleType) -> None:
    args = chaos.parse_args(["--host-faults", "kill-host, restart-postgres,freeze", "--hosts", "3"])
    assert args.host_faults == ["kill-host", "restart-postgres", "freeze"]
    assert (args.hosts, args.spawn) == (3, True)
    assert chaos.parse_args([]).host_faults == []
    assert chaos.parse_args([]).hosts == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--host-faults", "kill-host,reboot"],
        ["--host-faults", "freeze", "--hosts", "1"],
        ["--host-faults", "freeze", "--server", "http://127.0.0.1:1", "--data-dir", "/nonexistent"],
    ],
)
def test_refused_before_anything_starts(
    chaos: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        chaos.parse_args(argv)
    assert exited.value.code == 2
    assert "--host-faults" in capsys.readouterr().err
