"""The passt loopback guard's decisions (controller/qemu/passt_guard.py): its ruleset, the setting
that turns it on, and what mode passt is told when it cannot be installed. The rules themselves
meet the kernel in tests/component/test_passt_guard.py and a hostile guest in
tests/e2e/test_networking.py."""

from __future__ import annotations

import pytest

from controller.qemu import passt_guard
from controller.qemu.passt_guard import (
    GUARD_TABLE,
    NFT_SECONDS,
    guard_ruleset,
    install_guard,
    passt_host_problem,
)
from controller.settings import ControllerSettings


def test_the_guard_is_on_by_default_and_nft_gets_ten_seconds() -> None:
    assert ControllerSettings.model_fields["guest_loopback_guard"].default is True
    assert NFT_SECONDS == 10.0  # docs/networking.md


def test_the_ruleset_refuses_new_loopback_flows_of_passts_user_only() -> None:
    rules = guard_ruleset(65534)
    assert rules.splitlines()[:3] == [
        f"add table inet {GUARD_TABLE}",
        f"delete table inet {GUARD_TABLE}",  # one transaction replaces an earlier copy
        f"table inet {GUARD_TABLE} {{",
    ]
    assert "type filter hook output priority filter; policy accept;" in rules
    assert "meta skuid 65534 ip daddr 127.0.0.0/8 ct state new counter reject" in rules
    assert "meta skuid 65534 ip6 daddr ::1 ct state new counter reject" in rules
    assert rules.count("reject") == 2


def test_without_root_there_is_no_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert install_guard() == (
        "it needs the server to run as root, so that passt runs as nobody, whom it matches"
    )


@pytest.mark.parametrize(
    ("probed", "guard", "installed", "expected"),
    [
        ("", False, "never asked", ""),
        ("passt does not start (x)", True, "never asked", "passt does not start (x)"),
        ("", True, "", ""),
        (
            "",
            True,
            "nft failed (Operation not permitted)",
            "the loopback guard cannot be installed (nft failed (Operation not permitted)); without it "
            "a guest could reach the host's loopback: see docs/networking.md, setting guest_loopback_guard",
        ),
    ],
)
def test_mode_passt_runs_only_where_the_guard_asked_for_is_in_place(
    monkeypatch: pytest.MonkeyPatch, probed: str, guard: bool, installed: str, expected: str
) -> None:
    asked: list[bool] = []

    def install() -> str:
        asked.append(True)
        return installed

    monkeypatch.setattr(passt_guard, "probe", lambda: probed)
    monkeypatch.setattr(passt_guard, "install_guard", install)
    assert passt_host_problem(guard) == expected
    assert asked == ([True] if installed != "never asked" else [])
