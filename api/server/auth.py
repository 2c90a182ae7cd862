"""Authentication middleware: HTTP Basic or bearer token on every route but the public ones
(the probes, and /metrics when `metrics_auth` is off).

Terraform sends Basic credentials pre-emptively on every request
(docs/backend.md#requests-on-the-wire); OpenTofu >= 1.8 can send a bearer token through
`headers`. Both clients report 401 as "requires auth". Lock IDs are never a credential.

A hashed secret costs about 50 ms of scrypt to check, so:
- checks run in a pool of AUTH_WORKERS threads, with at most AUTH_PENDING_MAX waiting (429
  beyond): the event loop, and the probes and streams it serves, never waits for scrypt;
- a verified credential is remembered VERIFIED_TTL_SECONDS from its last use (VerifiedCache);
- failures are throttled per client address (an IPv6 client per /64) and per user name
  (ADDRESS_LIMIT, USER_LIMIT): a throttled client gets 429 with Retry-After and no check is
  run. A credential still in the cache passes, so an attacker who makes a user's failures pile
  up does not lock out that user's running Terraform. Unknown user names are throttled exactly
  like known ones;
- every failure is logged (`auth_failed`: client, scheme, user, reason; never the secret) and
  counted in tofu_qemu_auth_failures_total{reason}. A throttling is logged once when it starts.
Behind a reverse proxy every client has the proxy's address: the per-address limit is then
shared, and the per-user one still applies.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog
from aiohttp import web

from api.infra.credentials import Credentials, VerifiedCache
from api.infra.metrics import Metrics
from api.server.client_cert import client_certificate_user
from api.server.errors import Handler, status_response
from api.server.keys import PUBLIC_PATHS, SETTINGS
from api.server.throttle import FailureThrottle, Limit

log = structlog.get_logger(__name__)
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"
CHALLENGE = {"WWW-Authenticate": 'Basic realm="tofu-qemu", charset="UTF-8"'}
PRINCIPAL = web.RequestKey("principal", str)
ANONYMOUS = "anonymous"

AUTH_WORKERS = 2
AUTH_PENDING_MAX = 64
BUSY_RETRY_AFTER_SECONDS = 1
# 30 failures from one address, then one every 2 s (30 a minute).
ADDRESS_LIMIT = Limit(burst=30, drain_seconds=2.0)
# 10 failures for one user name, then one every 6 s (10 a minute), from all addresses together.
USER_LIMIT = Limit(burst=10, drain_seconds=6.0)
THROTTLE_KEYS_MAX = 10_000
VERIFIED_TTL_SECONDS = 300.0
VERIFIED_MAX = 1024
IPV6_CLIENT_PREFIX = 64
USER_LOGGED_CHARS = 64


def principal_of(request: web.Request) -> str:
    """Who made the request, for events and logs: "anonymous" when auth is off."""
    return request.get(PRINCIPAL) or ANONYMOUS


def public_paths(*, metrics_auth: bool) -> frozenset[str]:
    """What an app serves without credentials, for app[PUBLIC_PATHS]."""
    return PROBE_PATHS if metrics_auth else PROBE_PATHS | {METRICS_PATH}


@dataclass(frozen=True, slots=True)
class Presented:
    """Credentials as the client sent them. `user` is empty for a bearer token."""

    scheme: str
    user: str
    secret: str


def parse_authorization(header: str) -> Presented | None:
    """The credentials in an Authorization header, or None when it holds none we can read."""
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value.strip():
        return Presented("bearer", "", value.strip())
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError; so is non-ASCII
            return None
        username, sep, password = decoded.partition(":")
        return Presented("basic", username, password) if sep else None
    return None


def client_key(remote: str | None) -> str:
    """Whose failures count together: an IPv4 address, or an IPv6 /64 (one host's usual share)."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))
    return str(address)


class Authenticator:
    """Checks credentials off the event loop, remembers the good ones, throttles the bad ones."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        metrics: Metrics | None,
        workers: int = AUTH_WORKERS,
        pending_max: int = AUTH_PENDING_MAX,
        address_limit: Limit = ADDRESS_LIMIT,
        user_limit: Limit = USER_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.credentials = credentials
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="auth-check")
        self._pending_max = pending_max
        self._pending = 0
        self._pending_lock = threading.Lock()
        self.cache = VerifiedCache(ttl=VERIFIED_TTL_SECONDS, max_entries=VERIFIED_MAX, clock=clock)
        self._by_address = FailureThrottle(address_limit, max_keys=THROTTLE_KEYS_MAX, clock=clock)
        self._by_user = FailureThrottle(user_limit, max_keys=THROTTLE_KEYS_MAX, clock=clock)
        # User names are throttled by a keyed digest: bounded memory, and no stray password
        # typed into the name field is kept.
        self._user_key = secrets.token_bytes(16)

    async def authenticate(self, request: web.Request) -> str | web.Response:
        """The principal, or the 401 or 429 to answer."""
        header = request.headers.get("Authorization", "").strip()
        if not header:
            return _challenge()
        presented = parse_authorization(header)
        if presented is not None:
            cached = self.cache.lookup(presented.scheme, presented.user, presented.secret)
            if cached is not None:
                return cached
        buckets = self._buckets(client_key(request.remote), presented)
        refusal = self._throttled(request, buckets, presented)
        if refusal is not None:
            return refusal
        if presented is None:
            self._charge(buckets)
            self._failed(request, "malformed", None)
            return _challenge()
        if self._pending >= self._pending_max:
            self._count("busy")
            return _too_many(
                "too many authentications are being checked; retry shortly", BUSY_RETRY_AFTER_SECONDS
            )
        self._charge(buckets)
        principal = await self._check(presented)
        if principal is None:
            self._failed(request, "invalid", presented)
            return _challenge()
        for throttle, key in buckets:
            throttle.refund(key)
        self.cache.remember(presented.scheme, presented.user, presented.secret, principal)
        return principal

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _check(self, presented: Presented) -> str | None:
        if not self.credentials.hashed:  # microseconds of SHA-256: not worth a thread
            return self._verify(presented)
        with self._pending_lock:
            self._pending += 1
        future = self._executor.submit(self._verify, presented)
        # Counted down when the check ends, even if the request is cancelled before.
        future.add_done_callback(self._check_done)
        return await asyncio.wrap_future(future)

    def _check_done(self, _: object) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _verify(self, presented: Presented) -> str | None:
        if presented.scheme == "basic":
            return self.credentials.check_basic(presented.user, presented.secret)
        return self.credentials.check_bearer(presented.secret)

    def _buckets(self, client: str, presented: Presented | None) -> list[tuple[FailureThrottle, str]]:
        buckets = [(self._by_address, client)]
        if presented is not None and presented.scheme == "basic":
            name = presented.user.encode("utf-8", "surrogateescape")
            buckets.append((self._by_user, hmac.new(self._user_key, name, hashlib.sha256).hexdigest()))
        return buckets

    def _throttled(
        self, request: web.Request, buckets: list[tuple[FailureThrottle, str]], presented: Presented | None
    ) -> web.Response | None:
        waits = [(throttle, key, throttle.retry_after(key)) for throttle, key in buckets]
        refused = [(throttle, key, wait) for throttle, key, wait in waits if wait is not None]
        if not refused:
            return None
        self._count("throttled")
        retry_after = max(wait for _, _, wait in refused)
        for throttle, key, _ in refused:
            if throttle.newly_throttled(key):
                log.warning(
                    "auth_throttled",
                    by="user" if throttle is self._by_user else "address",
                    retry_after=retry_after,
                    **_who(request, presented),
                )
        return _too_many(f"too many failed authentications; retry in {retry_after} s", retry_after)

    def _charge(self, buckets: list[tuple[FailureThrottle, str]]) -> None:
        for throttle, key in buckets:
            throttle.charge(key)

    def _failed(self, request: web.Request, reason: str, presented: Presented | None) -> None:
        self._count(reason)
        where = {"method": request.method, "path": request.path}
        log.warning("auth_failed", reason=reason, **where, **_who(request, presented))

    def _count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.auth_failures_total.labels(reason=reason).inc()


AUTHENTICATOR = web.AppKey("authenticator", Authenticator)


async def close_authenticator(app: web.Application) -> None:
    """on_cleanup: stop the check threads."""
    app[AUTHENTICATOR].close()


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    authenticator = request.app[AUTHENTICATOR]
    if request.path in request.app[PUBLIC_PATHS] or not _logins_required(request, authenticator):
        return await handler(request)
    # Without an Authorization header, a verified client certificate may log in (opt-in).
    certified = None if request.headers.get("Authorization") else client_certificate_user(request)
    outcome = certified or await authenticator.authenticate(request)
    if isinstance(outcome, web.Response):
        return outcome
    request[PRINCIPAL] = outcome
    return await handler(request)


def _logins_required(request: web.Request, authenticator: Authenticator) -> bool:
    """Users or tokens are configured, or client certificates are logins: with any of them, every
    request but the public ones must log in. Certificates alone are not "auth off"."""
    settings = request.app.get(SETTINGS)
    return authenticator.credentials.enabled or (settings is not None and settings.tls_client_cert_users)


def _who(request: web.Request, presented: Presented | None) -> dict[str, str]:
    """What identifies an attempt in the logs; never the secret."""
    who = {"client": request.remote or "unknown"}
    if presented is not None:
        who["scheme"] = presented.scheme
        if presented.scheme == "basic":
            who["user"] = presented.user[:USER_LOGGED_CHARS]
    return who


def _challenge() -> web.Response:
    return status_response(
        401, "authentication required: valid Basic credentials or a bearer token", headers=CHALLENGE
    )


def _too_many(message: str, retry_after: int) -> web.Response:
    return status_response(429, message, headers={"Retry-After": str(retry_after)})
