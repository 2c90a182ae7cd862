"""Users and tokens: hashing, parsing and constant-time checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.credentials import CredentialsError, hash_password, load_credentials


def test_env_users_check_basic() -> None:
    """name:password pairs from the environment authenticate exactly those pairs."""
    credentials = load_credentials(users="alice:s3cret,bob:pa:ss", tokens=None, users_file=None)
    assert credentials.check_basic("alice", "s3cret") == "alice"
    assert credentials.check_basic("bob", "pa:ss") == "bob"
    assert credentials.check_basic("alice", "wrong") is None
    assert credentials.check_basic("mallory", "s3cret") is None


def test_env_tokens_check_bearer() -> None:
    """Bearer tokens from the environment authenticate; others do not."""
    credentials = load_credentials(users=None, tokens="tok-1, tok-2", users_file=None)
    assert credentials.check_bearer("tok-2") == "token:env-2"
    assert credentials.check_bearer("tok-3") is None


def test_no_credentials_means_auth_disabled() -> None:
    """With nothing configured the server knows auth is off (and refuses non-loopback)."""
    assert not load_credentials(users=None, tokens=None, users_file=None).enabled


@pytest.mark.parametrize("users", ["alice", ":pw", "alice:"])
def test_malformed_env_users_are_refused(users: str) -> None:
    """A user entry without both name and password is an error that names the entry, not the secret."""
    with pytest.raises(CredentialsError, match="entry 1 must be name:password"):
        load_credentials(users=users, tokens=None, users_file=None)


def test_users_file_with_hashes(tmp_path: Path) -> None:
    """Hashes from `hash-password` in the users file authenticate users and tokens."""
    users_file = tmp_path / "users.toml"
    users_file.write_text(
        f'[users]\nalice = "{hash_password("s3cret")}"\n[tokens]\nci = "{hash_password("tok")}"\n'
    )
    credentials = load_credentials(users=None, tokens=None, users_file=users_file)
    assert credentials.check_basic("alice", "s3cret") == "alice"
    assert credentials.check_basic("alice", "s3cret") == "alice"  # served from the verified cache
    assert credentials.check_basic("alice", "nope") is None
    assert credentials.check_bearer("tok") == "token:ci"


def test_hashes_are_salted() -> None:
    """The same password hashes differently each time."""
    assert hash_password("x") != hash_password("x")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param('[users]\nalice = "plain"\n', "expected a hash", id="plaintext"),
        pytest.param('[users]\nalice = "scrypt$a$b$c$d$e"\n', "malformed", id="bad-numbers"),
        pytest.param("[people]\n", "unknown tables", id="unknown-table"),
        pytest.param("[users\n", "cannot read", id="bad-toml"),
        pytest.param("users = 3\n", "must be a table", id="not-a-table"),
    ],
)
def test_malformed_users_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    """A users file that cannot be used stops the server with a reason."""
    users_file = tmp_path / "users.toml"
    users_file.write_text(content)
    with pytest.raises(CredentialsError, match=message):
        load_credentials(users=None, tokens=None, users_file=users_file)
