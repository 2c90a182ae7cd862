"""Fixtures for every kind of test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """Server commands run in-process set umask 077 (controller/cli.py); the next test must not
    inherit it, nor a file-mode test depend on what ran before it."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield
    os.umask(previous)
