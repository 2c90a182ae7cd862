"""Where a disk's base image comes from: a file in the images dir, the sha256 cache, or a URL.

Pure: parsing and validation only. The controller's image cache (controller/images/) fetches
and verifies; this module decides what a spec's `image` and `sha256` mean, and refuses what
could reach outside the images dir or into a log (credentials in a URL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

SHA256_PREFIX = "sha256:"
# The cache's sub-folder of the images dir: DATA/images/sha256/<hex>.
CACHE_DIR_NAME = "sha256"
URL_MAX = 2048
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_URL_SCHEMES = ("http", "https")


@dataclass(frozen=True, slots=True)
class LocalImage:
    """A file in the images dir, used as it is."""

    path: str


@dataclass(frozen=True, slots=True)
class CachedImage:
    """A content-addressed file of the cache: images/sha256/<digest>."""

    digest: str

    @property
    def path(self) -> str:
        return f"{CACHE_DIR_NAME}/{self.digest}"


@dataclass(frozen=True, slots=True)
class RemoteImage:
    """A file to download. `digest` None: it is read from the `<url>.sha256` sidecar."""

    url: str
    digest: str | None

    @property
    def sidecar_url(self) -> str:
        return self.url + ".sha256"


ImageSource = LocalImage | CachedImage | RemoteImage


def is_url(image: str) -> bool:
    return image.partition("://")[0].lower() in _URL_SCHEMES


def digest_problem(value: str) -> str | None:
    if _HEX_RE.fullmatch(value):
        return None
    return f"{value[:80]!r} is not a sha256 digest (64 lowercase hex digits)"


def url_problem(url: str) -> str | None:
    """Why `url` cannot be downloaded from, or None. Credentials are refused: they would be
    stored in the state's spec, shown by the API and logged."""
    if len(url) > URL_MAX:
        return f"an image URL may be at most {URL_MAX} characters"
    if any(ch <= " " or ch == "\x7f" for ch in url):
        return "an image URL may not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as err:
        return f"image URL {url[:80]!r} is malformed: {err}"
    if parts.scheme not in _URL_SCHEMES:
        return f"image URL {url[:80]!r} must use http or https (lowercase)"
    if not parts.hostname:
        return f"image URL {url[:80]!r} has no host"
    if parts.username is not None or parts.password is not None:
        return "an image URL may not carry credentials"
    if parts.fragment:
        return "an image URL may not have a #fragment"
    return None


def image_source(image: str, sha256: str | None) -> ImageSource:
    """The source a validated `image` (and `sha256`) name."""
    if image.startswith(SHA256_PREFIX):
        return CachedImage(image.removeprefix(SHA256_PREFIX))
    if is_url(image):
        return RemoteImage(image, sha256)
    return LocalImage(image)


def parse_sidecar(text: str, url: str) -> str | None:
    """The digest a `.sha256` sidecar gives for `url`'s file, or None if it gives none.

    Accepts a bare digest or `sha256sum` output ("<hex>  name" per line, '*' for binary mode);
    with several lines, the one naming the URL's file name is taken.
    """
    wanted = url.rstrip("/").rsplit("/", 1)[-1]
    entries: list[tuple[str, str]] = []
    for line in text.splitlines()[:1000]:
        fields = line.strip().split(maxsplit=1)
        if not fields or not _HEX_RE.fullmatch(fields[0].lower()):
            continue
        entries.append((fields[0].lower(), fields[1].lstrip("*") if len(fields) > 1 else ""))
    if len(entries) == 1:
        return entries[0][0]
    matching = {digest for digest, name in entries if name.rsplit("/", 1)[-1] == wanted}
    return matching.pop() if len(matching) == 1 else None
