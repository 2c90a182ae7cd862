"""Users and tokens: hashing, parsing and constant-time checks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from api.infra.credentials import CredentialsError, VerifiedCache, hash_password, load_credentials


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


# ---- Timing: the cost of a check does not tell which users exist ---------------------------------

CHECK_ROUNDS = 5


def median_seconds(check: Callable[[], object]) -> float:
    """The median CPU time of `check` on this thread: scrypt is CPU-bound, and what an attacker
    times is the work done, which CPU time measures without the noise of other processes'
    load on a shared machine (wall time there varied more than 2x between rounds)."""
    times = []
    for _ in range(CHECK_ROUNDS):
        started = time.thread_time()
        check()
        times.append(time.thread_time() - started)
    return statistics.median(times)


def users_file_with(tmp_path: Path, **users: str) -> Path:
    path = tmp_path / "users.toml"
    path.write_text("[users]\n" + "".join(f'{name} = "{hash_password(pw)}"\n' for name, pw in users.items()))
    return path


@pytest.mark.parametrize("env_user", [False, True], ids=["users-file", "env-user-beside-users-file"])
def test_an_unknown_user_costs_what_a_known_one_does(tmp_path: Path, env_user: bool) -> None:
    """A wrong password for a known user and any password for an unknown one cost the same scrypt,
    within 2x (it was 52 ms against 0.9 ms): the time does not reveal who exists. A user from the
    environment beside hashed ones pays one scrypt too."""
    credentials = load_credentials(
        users="carol:plain" if env_user else None,
        tokens=None,
        users_file=users_file_with(tmp_path, alice="s3cret"),
    )
    known = "carol" if env_user else "alice"
    known_cost = median_seconds(lambda: credentials.check_basic(known, "wrong"))
    unknown_cost = median_seconds(lambda: credentials.check_basic("mallory", "wrong"))
    assert known_cost / 2 < unknown_cost < known_cost * 2, (known_cost, unknown_cost)
    assert credentials.hashed
    assert credentials.check_basic(known, "s3cret" if known == "alice" else "plain") == known


def test_without_hashes_nothing_is_slow() -> None:
    """Users and tokens from the environment only: SHA-256, no scrypt, no thread needed."""
    credentials = load_credentials(users="alice:s3cret", tokens="tok", users_file=None)
    assert not credentials.hashed
    assert median_seconds(lambda: credentials.check_basic("mallory", "x")) < 0.005


# ---- The cache of verified credentials ----------------------------------------------------------


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_cache_remembers_for_its_ttl_from_the_last_use() -> None:
    ticks = Ticks()
    cache = VerifiedCache(ttl=300, max_entries=8, clock=ticks)
    assert cache.lookup("basic", "alice", "s3cret") is None
    cache.remember("basic", "alice", "s3cret", "alice")
    ticks.now += 299
    assert cache.lookup("basic", "alice", "s3cret") == "alice"
    ticks.now += 299  # 598 s after it was verified, 299 s after its last use
    assert cache.lookup("basic", "alice", "s3cret") == "alice"
    ticks.now += 300
    assert cache.lookup("basic", "alice", "s3cret") is None
    assert len(cache) == 0


def test_the_cache_matches_only_the_exact_credential() -> None:
    cache = VerifiedCache(ttl=300, max_entries=8)
    cache.remember("basic", "alice", "s3cret", "alice")
    for scheme, user, secret in [
        ("basic", "alice", "s3cre"),
        ("basic", "alic", "es3cret"),
        ("bearer", "", "alices3cret"),
        ("basic", "alice\0", "s3cret"),
    ]:
        assert cache.lookup(scheme, user, secret) is None, (scheme, user, secret)


def test_the_cache_is_bounded_and_holds_no_secret() -> None:
    """At most max_entries, least recently used dropped; what it keeps are 32-byte digests under a
    key of its own (another process's cache would not recognise them)."""
    cache = VerifiedCache(ttl=300, max_entries=2)
    for name in ("a", "b", "c"):
        cache.remember("basic", name, f"secret-{name}", name)
    assert len(cache) == 2
    assert cache.lookup("basic", "a", "secret-a") is None
    assert cache.lookup("basic", "c", "secret-c") == "c"
    stored = list(vars(cache)["_entries"])
    assert all(len(key) == 32 and b"secret" not in key for key in stored)
    other = VerifiedCache(ttl=300, max_entries=2)
    other.remember("basic", "c", "secret-c", "c")
    assert list(vars(other)["_entries"]) != stored[-1:]
