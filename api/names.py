"""Validation of the names that end up in URLs, SQL keys, file names and QEMU arguments.

Every name is checked against an allow-list instead of being escaped, so no later consumer
(a path join, a QEMU option string, a log line) needs to think about it again.
"""

from __future__ import annotations

import re

PROJECT_NAME_MAX = 128
# Letters, digits, '-', '_', '.'; the first character alphanumeric so that '.', '..', '-x' and
# '_x' (a path component, an option-looking argument) can never be a project.
_PROJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

# RFC 1123 DNS label, as Kubernetes requires for most object names.
DNS_LABEL_MAX = 63
DNS_LABEL_PATTERN = "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS_LABEL_RE = re.compile(DNS_LABEL_PATTERN)

# Kubernetes label keys and values (prefix/name), kept strict: they are shown in tables and
# may become QEMU `-name` or SMBIOS strings later.
_LABEL_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_LABEL_PREFIX_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
LABELS_MAX = 64
# Messages quote at most this much of a refused value: they end up in conditions and tables.
QUOTED_MAX = 80


def project_name_problem(name: str) -> str | None:
    """Return why `name` is not a valid project name, or None if it is."""
    if _PROJECT_RE.fullmatch(name):
        return None
    if not name:
        return "project name is empty"
    if len(name) > PROJECT_NAME_MAX:
        return f"project name is {len(name)} characters long; at most {PROJECT_NAME_MAX} allowed"
    return (
        f"project name {name[:PROJECT_NAME_MAX]!r} is invalid: use letters, digits, '-', '_' "
        "and '.', starting with a letter or digit"
    )


def dns_label_problem(name: str) -> str | None:
    """Return why `name` is not an RFC 1123 label (lowercase, digits, '-'), or None."""
    if _DNS_LABEL_RE.fullmatch(name):
        return None
    if len(name) > DNS_LABEL_MAX:
        return f"must be at most {DNS_LABEL_MAX} characters"
    return "must be lowercase letters, digits and '-', starting and ending with a letter or digit"


def label_key_problem(key: str) -> str | None:
    """Return why `key` is not a Kubernetes label key (`[prefix/]name`), or None."""
    prefix, slash, name = key.rpartition("/")
    # `slash`, not `prefix`: "/name" has an empty prefix, which Kubernetes refuses too.
    if slash and not _LABEL_PREFIX_RE.fullmatch(prefix):
        return f"label key {key[:QUOTED_MAX]!r}: the prefix must be a DNS subdomain"
    if not _LABEL_NAME_RE.fullmatch(name):
        return (
            f"label key {key[:QUOTED_MAX]!r}: the name must be 1-63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Return why `value` is not a Kubernetes label value, or None."""
    if value == "" or _LABEL_NAME_RE.fullmatch(value):
        return None
    return (
        f"label value {value[:QUOTED_MAX]!r}: must be empty or 1-63 letters, digits, '-', '_' or '.', "
        "starting and ending with a letter or digit"
    )
