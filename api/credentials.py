"""Who may call the server: HTTP Basic users and bearer tokens.

Secrets are compared in constant time. Stored hashes are scrypt (stdlib, memory-hard); because
Terraform sends credentials on every request (docs/backend.md#requests-on-the-wire), a
successful verification is remembered by a keyed digest so that only the first request of a
client pays for scrypt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import tomllib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SCRYPT_PREFIX = "scrypt"
_VERIFIED_CACHE_SIZE = 1024


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
    """The configured users and tokens; `check_*` return the principal's name or None."""

    users: dict[str, _Secret] = field(default_factory=dict)
    tokens: dict[str, _Secret] = field(default_factory=dict)
    _cache_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _verified: OrderedDict[bytes, str] = field(default_factory=OrderedDict)

    @property
    def enabled(self) -> bool:
        return bool(self.users or self.tokens)

    def check_basic(self, username: str, password: str) -> str | None:
        secret = self.users.get(username)
        # Unknown users still pay one comparison so timing does not reveal who exists.
        if secret is None:
            _Secret.from_plain("").matches(password)
            return None
        return username if self._verify(f"user:{username}", secret, password) else None

    def check_bearer(self, token: str) -> str | None:
        for name, secret in self.tokens.items():
            if self._verify(f"token:{name}", secret, token):
                return f"token:{name}"
        return None

    def _verify(self, principal: str, secret: _Secret, presented: str) -> bool:
        if secret.plain_digest is not None:
            return secret.matches(presented)
        key = hmac.new(self._cache_key, _presented_bytes(f"{principal}\0{presented}"), "sha256").digest()
        if self._verified.get(key) == principal:
            self._verified.move_to_end(key)
            return True
        if not secret.matches(presented):
            return False
        self._verified[key] = principal
        if len(self._verified) > _VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return True


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
