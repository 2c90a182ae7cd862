"""A small synchronous HTTP client for the tofu-qemu API: one request per command, or one stream.

Where to connect and how to authenticate come from flags or the environment, the same
credentials the server accepts: TOFU_QEMU_SERVER, TOFU_QEMU_USERNAME + TOFU_QEMU_PASSWORD
(Basic) or TOFU_QEMU_TOKEN (Bearer). Proxies follow the usual *_proxy variables, as with curl.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8080"
REQUEST_TIMEOUT_SECONDS = 30.0
# Streams (watch, logs -f) get a heartbeat or data at least this often, or are dead.
STREAM_TIMEOUT_SECONDS = 90.0
STREAM_CHUNK = 16 * 1024
ERROR_BODY_MAX = 64 * 1024


class ClientError(Exception):
    """The command failed; the message says why. Exit status 1."""


class ApiError(ClientError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NotFoundError(ApiError):
    pass


@dataclass(frozen=True, slots=True)
class Connection:
    server: str
    authorization: str | None = None
    ssl_context: ssl.SSLContext | None = None

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        with self._open("GET", path, params) as response:
            return json.load(response)

    def post_json(self, path: str, body: Any = None, params: Mapping[str, str] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        with self._open("POST", path, params, data=data) as response:
            return json.load(response)

    def delete_json(self, path: str) -> Any:
        with self._open("DELETE", path, None) as response:
            return json.load(response)

    def stream_lines(self, path: str, params: Mapping[str, str] | None = None) -> Iterator[bytes]:
        """Lines of a streamed response (watch), until the server ends it."""
        with self._open("GET", path, params, timeout=STREAM_TIMEOUT_SECONDS) as response:
            try:
                yield from response
            except OSError as err:
                raise ClientError(f"the stream from {self.server} broke: {err}") from None

    def stream_bytes(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        timeout: float | None = STREAM_TIMEOUT_SECONDS,
    ) -> Iterator[bytes]:
        """Chunks of a response; `timeout` None for a stream that may be quiet for long (a
        followed console has nothing to send while the guest is silent)."""
        with self._open("GET", path, params, timeout=timeout) as response:
            try:
                while chunk := response.read1(STREAM_CHUNK):
                    yield chunk
            except OSError as err:
                raise ClientError(f"the stream from {self.server} broke: {err}") from None

    def _open(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        *,
        data: bytes | None = None,
        timeout: float | None = REQUEST_TIMEOUT_SECONDS,
    ) -> Any:
        url = self.server.rstrip("/") + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http(s) only, checked
        if self.authorization:
            request.add_header("Authorization", self.authorization)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            return urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context)  # noqa: S310
        except urllib.error.HTTPError as err:
            raise _api_error(err) from None
        except OSError as err:  # URLError, refused, timed out
            reason = getattr(err, "reason", err)
            raise ClientError(f"cannot reach {self.server}: {reason}") from None


def _api_error(err: urllib.error.HTTPError) -> ApiError:
    body = err.read(ERROR_BODY_MAX)
    try:
        message = str(json.loads(body).get("message") or body.decode(errors="replace"))
    except (ValueError, AttributeError):
        message = body.decode(errors="replace").strip() or str(err.reason)
    kind = NotFoundError if err.code == 404 else ApiError
    return kind(err.code, f"{err.code} {err.reason}: {message}")


def connect(
    server: str | None,
    env: Mapping[str, str],
    *,
    ca_file: str | None = None,
    insecure: bool = False,
) -> Connection:
    """:raise ClientError: an unusable server address or half-given credentials."""
    address = server or env.get("TOFU_QEMU_SERVER") or DEFAULT_SERVER
    scheme = urllib.parse.urlsplit(address).scheme
    if scheme not in ("http", "https"):
        raise ClientError(f"server {address!r} must be an http:// or https:// URL")
    return Connection(address, _authorization(env), _ssl_context(scheme, ca_file, insecure))


def _authorization(env: Mapping[str, str]) -> str | None:
    token = env.get("TOFU_QEMU_TOKEN")
    user, password = env.get("TOFU_QEMU_USERNAME"), env.get("TOFU_QEMU_PASSWORD")
    if token:
        return f"Bearer {token}"
    if user or password:
        if not (user and password is not None):
            raise ClientError("set both TOFU_QEMU_USERNAME and TOFU_QEMU_PASSWORD (or TOFU_QEMU_TOKEN)")
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return None


def _ssl_context(scheme: str, ca_file: str | None, insecure: bool) -> ssl.SSLContext | None:
    if scheme != "https":
        return None
    context = ssl.create_default_context(cafile=ca_file)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
