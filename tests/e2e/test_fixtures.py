"""The committed Terraform state fixtures are what the real Terraform writes today."""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.harness import REPO_ROOT

pytestmark = pytest.mark.e2e


def test_state_fixtures_match_a_new_terraform_run(terraform_bin: str) -> None:
    """hack/gen-fixtures --check re-applies the lab with Terraform into a temp dir and compares
    all but the random terraform_data ids (and the envelope's ciphertext, compared decrypted)."""
    result = subprocess.run(
        [str(REPO_ROOT / "hack" / "gen-fixtures"), "--check", "--terraform", terraform_bin],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
