"""Base images by content: the sha256 cache and the verified downloads that fill it."""

from controller.images.cache import ImageCache
from controller.images.download import ChecksumMismatch, DownloadError, DownloadFailed, DownloadRefused

__all__ = ["ChecksumMismatch", "DownloadError", "DownloadFailed", "DownloadRefused", "ImageCache"]
