"""Base images by content: the sha256 cache and the verified downloads that fill it."""

from controller.images.cache import ImageCache
from controller.images.download import ChecksumMismatch
from controller.images.egress import EgressPolicy, parse_networks
from controller.images.fetch import DownloadError, DownloadFailed, DownloadRefused, FetchLimits

__all__ = [
    "ChecksumMismatch",
    "DownloadError",
    "DownloadFailed",
    "DownloadRefused",
    "EgressPolicy",
    "FetchLimits",
    "ImageCache",
    "parse_networks",
]
