"""Incremental resync (controller/resync.py): which keys a pass queues, one row per situation."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.resync import Fingerprint, ResyncSelector
from controller.settings import ControllerSettings

FULL_EVERY = 300.0
STEADY = Fingerprint(
    version=7, ledger=(), runtime_dir=(11, 1_000), records=(900, None), process=(4242, 55, True)
)


def test_the_default_periods() -> None:
    """docs/controller.md: a resync every 30 s, of every VM every 300 s; liveness every 10 s."""
    settings = ControllerSettings()
    assert settings.resync_seconds == 30.0
    assert settings.full_resync_seconds == 300.0
    assert settings.liveness_seconds == 10.0


def test_the_first_pass_is_full() -> None:
    selector = ResyncSelector(full_every=FULL_EVERY)
    choice = selector.choose({"a": STEADY, "b": STEADY}, now=0.0)
    assert (choice.keys, choice.full, choice.skipped) == (("a", "b"), True, 0)


@pytest.mark.parametrize(
    ("later", "queued"),
    [
        (STEADY, False),
        (replace(STEADY, version=8), True),  # spec, deletion, override or status written
        (replace(STEADY, ledger=("port",)), True),  # a port or disk row came or went
        (replace(STEADY, runtime_dir=None), True),  # runtime dir removed
        (replace(STEADY, runtime_dir=(11, 2_000)), True),  # a file created or removed in it
        (replace(STEADY, runtime_dir=(12, 1_000)), True),  # removed and made again
        (replace(STEADY, records=(900, 950)), True),  # an exit recorded
        (replace(STEADY, records=(960, None)), True),  # launched again
        (replace(STEADY, process=(4242, 55, False)), True),  # killed, no event seen
        (replace(STEADY, process=None), True),  # no longer watched
    ],
)
def test_a_pass_queues_a_key_only_when_its_fingerprint_changed(later: Fingerprint, queued: bool) -> None:
    selector = ResyncSelector(full_every=FULL_EVERY)
    selector.choose({"vm": STEADY, "other": STEADY}, now=0.0)
    choice = selector.choose({"vm": later, "other": STEADY}, now=30.0)
    assert choice.keys == (("vm",) if queued else ())
    assert (choice.full, choice.skipped) == (False, 1 if queued else 2)


def test_new_keys_are_queued_and_gone_ones_forgotten() -> None:
    selector = ResyncSelector(full_every=FULL_EVERY)
    selector.choose({"a": STEADY}, now=0.0)
    assert selector.choose({"b": STEADY}, now=30.0).keys == ("b",)
    # "a" is back: it was forgotten, so it counts as new.
    assert selector.choose({"a": STEADY, "b": STEADY}, now=60.0).keys == ("a",)


def test_every_key_is_queued_once_a_full_period_has_passed() -> None:
    selector = ResyncSelector(full_every=FULL_EVERY)
    selector.choose({"a": STEADY, "b": STEADY}, now=0.0)
    assert selector.choose({"a": STEADY, "b": STEADY}, now=299.0).keys == ()
    full = selector.choose({"a": STEADY, "b": STEADY}, now=300.0)
    assert (full.keys, full.full) == (("a", "b"), True)
    # The full period counts from the last full pass.
    assert selector.choose({"a": STEADY, "b": STEADY}, now=330.0).keys == ()
    assert selector.choose({"a": STEADY, "b": STEADY}, now=600.0).full


def test_a_change_is_seen_once_then_the_key_is_steady_again() -> None:
    """The reconcile a change causes writes status (a new version): queued once more, then skipped."""
    selector = ResyncSelector(full_every=FULL_EVERY)
    selector.choose({"vm": STEADY}, now=0.0)
    changed = replace(STEADY, process=(4242, 55, False))
    assert selector.choose({"vm": changed}, now=30.0).keys == ("vm",)
    after = replace(changed, version=8, process=None)
    assert selector.choose({"vm": after}, now=60.0).keys == ("vm",)
    assert selector.choose({"vm": after}, now=90.0).keys == ()
