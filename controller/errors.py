"""Reconcile errors, typed by what the worker does about them.

- `TransientError`: retry with per-key backoff (QMP timeout, busy port, full disk).
- `TerminalError`: record the condition; no retry until the spec changes.
Anything else is unexpected: logged once with its traceback, then retried with backoff.
"""

from __future__ import annotations


class TransientError(Exception):
    """Worth retrying after a delay."""


class TerminalError(Exception):
    """Retrying will not help until the spec changes."""
