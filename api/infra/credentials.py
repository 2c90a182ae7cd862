"""Who may call the server: HTTP Basic users and bearer tokens.

Secrets are compared in constant time. Stored hashes are scrypt (stdlib, memory-hard), about 50 ms
of CPU per check: the server runs checks in a thread pool (api/server/auth.py). Every Basic check
costs the same whoever the user is: an unknown user is checked against a dummy of the same kind
and parameters as the real users' secrets, so timing does not tell which names exist.

Because Terraform sends credentials on every request (docs/backend.md#requests-on-the-wire), a
successful verification is remembered for a while (`VerifiedCache`) by an HMAC of the credential
under a per-process random key, so that only the first request of a client pays for scrypt and
the cache never holds a secret.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SCRYPT_PREFIX = "scrypt"


class CredentialsError(ValueError):
    """A users file or credential string that cannot be used."""


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Return `scrypt$N$r$p$salt$hash` for storing in a users file."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return "$".join((_SCRYPT_PREFIX, str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class _Secret:
    """A secret as configured: either a plaintext (from the environment) or a scrypt hash."""

    plain_digest: bytes | None = None
    scrypt: tuple[int, int, int, bytes, bytes] | None = None

    @classmethod
    def from_plain(cls, secret: str) -> _Secret:
        return cls(plain_digest=hashlib.sha256(secret.encode()).digest())

    @classmethod
    def from_hash(cls, encoded: str, *, where: str) -> _Secret:
        parts = encoded.split("$")
        if len(parts) != 6 or parts[0] != _SCRYPT_PREFIX:
            raise CredentialsError(f"{where}: expected a hash from `tofu-qemu hash-password`")
        try:
            n, r, p = (int(x) for x in parts[1:4])
            return cls(scrypt=(n, r, p, _unb64(parts[4]), _unb64(parts[5])))
        except ValueError as err:
            raise CredentialsError(f"{where}: malformed scrypt hash") from err

    def matches(self, secret: str) -> bool:
        presented = _presented_bytes(secret)
        if self.plain_digest is not None:
            return hmac.compare_digest(self.plain_digest, hashlib.sha256(presented).digest())
        assert self.scrypt is not None
        n, r, p, salt, expected = self.scrypt
        actual = hashlib.scrypt(presented, salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024)
        return hmac.compare_digest(expected, actual)


@dataclass
class Credentials:
    """The configured users and tokens; `check_*` return the principal's name or None.

    The checks block for as long as scrypt takes when `hashed` (a users file is in use).
    """

    users: dict[str, _Secret] = field(default_factory=dict)
    tokens: dict[str, _Secret] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.users or self.tokens)

    @property
    def hashed(self) -> bool:
        """Whether a check may run scrypt (and so belongs off the event loop)."""
        return any(secret.scrypt is not None for secret in (*self.users.values(), *self.tokens.values()))

    @functools.cached_property
    def _dummy(self) -> _Secret:
        """What an unknown user is checked against: the costliest kind of the users' secrets."""
        params = [secret.scrypt[:3] for secret in self.users.values() if secret.scrypt is not None]
        if not params:
            return _Secret.from_plain(secrets.token_urlsafe(16))
        n, r, p = max(params, key=lambda nrp: nrp[0] * nrp[1] * nrp[2])
        return _Secret(scrypt=(n, r, p, secrets.token_bytes(16), secrets.token_bytes(64)))

    def check_basic(self, username: str, password: str) -> str | None:
        secret = self.users.get(username)
        dummy = self._dummy
        if secret is None:
            dummy.matches(password)
            return None
        matched = secret.matches(password)
        if secret.scrypt is None and dummy.scrypt is not None:
            # A user from the environment beside hashed ones: as slow as theirs, or its name shows.
            dummy.matches(password)
        return username if matched else None

    def check_bearer(self, token: str) -> str | None:
        for name, secret in self.tokens.items():
            if secret.matches(token):
                return f"token:{name}"
        return None


class VerifiedCache:
    """Credentials verified recently, by an HMAC-SHA256 of the credential under a random key made
    for this cache: a lookup costs a microsecond, and what is kept cannot be turned back into the
    secret without the key. An entry lives `ttl` seconds from its last use; at most `max_entries`,
    least recently used dropped first.

    Brief on purpose: a memory dump holds the key too, and then each entry can be guessed at
    HMAC speed instead of scrypt speed.
    """

    def __init__(self, *, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def lookup(self, scheme: str, user: str, secret: str) -> str | None:
        """The principal these credentials were verified as, if that was recent."""
        key = self._digest(scheme, user, secret)
        entry = self._entries.get(key)
        if entry is None:
            return None
        principal, expires = entry
        now = self._clock()
        if now >= expires:
            del self._entries[key]
            return None
        self._entries[key] = (principal, now + self._ttl)
        self._entries.move_to_end(key)
        return principal

    def remember(self, scheme: str, user: str, secret: str, principal: str) -> None:
        key = self._digest(scheme, user, secret)
        self._entries[key] = (principal, self._clock() + self._ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def _digest(self, scheme: str, user: str, secret: str) -> bytes:
        # Lengths first: ("a\0b", "c") and ("a", "b\0c") are different credentials.
        parts = [_presented_bytes(part) for part in (scheme, user, secret)]
        message = b"".join(len(part).to_bytes(4, "big") + part for part in parts)
        return hmac.new(self._key, message, "sha256").digest()


def load_credentials(*, users: str | None, tokens: str | None, users_file: Path | None) -> Credentials:
    """Build the credentials from `name:password,...`, `tok1,tok2` and an optional users file.

    The users file is TOML::

        [users]
        alice = "scrypt$16384$8$1$..."   # from `tofu-qemu hash-password`
        [tokens]
        ci = "scrypt$16384$8$1$..."

    :raise CredentialsError: malformed input, with the offending entry named (never its secret).
    """
    credentials = Credentials()
    for index, entry in enumerate(filter(None, (users or "").split(","))):
        name, sep, password = entry.partition(":")
        if not sep or not name or not password:
            raise CredentialsError(f"TOFU_QEMU_USERS entry {index + 1} must be name:password")
        credentials.users[name] = _Secret.from_plain(password)
    for index, token in enumerate(filter(None, (tokens or "").split(","))):
        credentials.tokens[f"env-{index + 1}"] = _Secret.from_plain(token.strip())
    if users_file is not None:
        _load_users_file(users_file, credentials)
    return credentials


def _load_users_file(path: Path, credentials: Credentials) -> None:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise CredentialsError(f"cannot read users file {path}: {err}") from err
    unknown = set(document) - {"users", "tokens"}
    if unknown:
        raise CredentialsError(f"users file {path}: unknown tables {', '.join(sorted(unknown))}")
    for table, target in (("users", credentials.users), ("tokens", credentials.tokens)):
        entries = document.get(table, {})
        if not isinstance(entries, dict):
            raise CredentialsError(f"users file {path}: [{table}] must be a table")
        for name, encoded in entries.items():
            if not isinstance(encoded, str):
                raise CredentialsError(f"users file {path}: {table}.{name} must be a string")
            target[name] = _Secret.from_hash(encoded, where=f"users file {path}: {table}.{name}")


def _presented_bytes(text: str) -> bytes:
    """Credentials as sent. Header bytes that are not UTF-8 reach us as surrogate escapes; they
    turn back into those bytes (and so match nothing) instead of failing to encode."""
    return text.encode("utf-8", "surrogateescape")
