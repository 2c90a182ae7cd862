"""The field types of the QemuVM API: limits, allow-list validators and the annotated types
built from them (api/types.py composes the models from these).

Every validator that may guard a QEMU command line or a file path is an allow-list. Each also
registers, in VALIDATOR_SCHEMAS, the OpenAPI constraints it enforces, so api/crd.py publishes the
same rules to schema-only clients.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BeforeValidator, Strict, ValidationError

from api import images, names, quantity

MEMORY_MIN_MIB = 16
MEMORY_MAX_MIB = 1024 * 1024
DISK_MAX_MIB = 64 * 1024 * 1024
CPUS_MAX = 64
STOP_TIMEOUT_MAX_SECONDS = 3600
DISKS_MAX = 16
FORWARDS_MAX = 32
CMDLINE_MAX = 2048
IMAGE_PATH_MAX = 255
# cloud-init: AWS allows 16 KiB of user data; a seed ISO has room, a state file and a table less.
CLOUD_INIT_DATA_MAX = 64 * 1024
SSH_KEYS_MAX = 32
SSH_KEY_MAX = 8 * 1024
# A message lists this many validation errors and counts the rest.
ERRORS_SHOWN_MAX = 10


# The OpenAPI constraints each validator below enforces, by validator function. api/crd.py
# publishes them in the CRD and the served OpenAPI v3, so a schema-only client (an apiserver
# with crds/qemuvm.yaml, kubectl explain) refuses the same values. pydantic stays the authority:
# a constraint here may be looser than its validator (bytes vs characters), never stricter.
VALIDATOR_SCHEMAS: dict[Callable[..., Any], dict[str, Any]] = {}
_F = TypeVar("_F", bound=Callable[..., Any])


def publishes(**constraints: Any) -> Callable[[_F], _F]:
    def register(function: _F) -> _F:
        VALIDATOR_SCHEMAS[function] = constraints
        return function

    return register


def anchored(*alternatives: str) -> str:
    return "^(" + "|".join(alternatives) + ")$"


@publishes(maxLength=names.DNS_LABEL_MAX, pattern=anchored(names.DNS_LABEL_PATTERN))
def _check_dns_label(value: str) -> str:
    problem = names.dns_label_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# A file name inside the images dir, possibly in sub-folders. Every segment starts with a
# letter, digit or '_', so '..', '.hidden', '-option' and absolute paths cannot be written,
# and ',' / '=' (QEMU option syntax) are simply not in the alphabet.
_IMAGE_PATH_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*"
_IMAGE_PATH_RE = re.compile(_IMAGE_PATH_PATTERN)
_DIGEST_PATTERN = "[0-9a-f]{64}"
_URL_PATTERN = r"https?://\S+"


@publishes(maxLength=IMAGE_PATH_MAX, pattern=anchored(_IMAGE_PATH_PATTERN))
def _check_image_path(value: str) -> str:
    if len(value) > IMAGE_PATH_MAX:
        raise ValueError(f"must be at most {IMAGE_PATH_MAX} characters")
    if not _IMAGE_PATH_RE.fullmatch(value):
        raise ValueError(
            f"{value[:80]!r} must be a file name inside the images dir: letters, digits, "
            "'_', '.', '+', '-' and '/' between names; no '..', no leading '/', '.' or '-'"
        )
    return value


@publishes(
    maxLength=max(images.URL_MAX, IMAGE_PATH_MAX),
    pattern=anchored(images.SHA256_PREFIX + _DIGEST_PATTERN, _URL_PATTERN, _IMAGE_PATH_PATTERN),
)
def _check_image(value: str) -> str:
    """A file of the images dir, `sha256:<hex>` (the cache), or an http(s) URL."""
    if value.startswith(images.SHA256_PREFIX):
        problem = images.digest_problem(value.removeprefix(images.SHA256_PREFIX))
        if problem:
            raise ValueError(f"sha256: image: {problem}")
        return value
    if images.is_url(value):
        problem = images.url_problem(value)
        if problem:
            raise ValueError(problem)
        return value
    return _check_image_path(value)


# `.lower()` comes first: "SHA256:" and upper-case hex are accepted.
@publishes(pattern=anchored("([sS][hH][aA]256:)?[0-9a-fA-F]{64}"))
def _check_digest(value: str) -> str:
    value = value.lower().removeprefix(images.SHA256_PREFIX)
    problem = images.digest_problem(value)
    if problem:
        raise ValueError(problem)
    return value


@publishes(maxLength=CLOUD_INIT_DATA_MAX)
def _check_cloud_init_text(value: str) -> str:
    if len(value.encode()) > CLOUD_INIT_DATA_MAX:
        raise ValueError(f"must be at most {CLOUD_INIT_DATA_MAX // 1024} KiB")
    if "\x00" in value:
        raise ValueError("may not contain NUL characters")
    return value


def _check_cloud_init_object(value: dict[str, Any]) -> dict[str, Any]:
    try:
        size = len(json.dumps(value, ensure_ascii=False).encode())
    except (TypeError, ValueError) as err:
        raise ValueError(f"must be plain JSON data: {err}") from None
    if size > CLOUD_INIT_DATA_MAX:
        raise ValueError(f"must be at most {CLOUD_INIT_DATA_MAX // 1024} KiB as JSON")
    return value


_SSH_KEY_PATTERN = r"(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+( [ -~]*)?"
_SSH_KEY_RE = re.compile(_SSH_KEY_PATTERN)


@publishes(maxLength=SSH_KEY_MAX, pattern=r"^\s*" + _SSH_KEY_PATTERN + r"\s*$")
def _check_ssh_key(value: str) -> str:
    if len(value) > SSH_KEY_MAX:
        raise ValueError(f"an SSH key may be at most {SSH_KEY_MAX} characters")
    if not _SSH_KEY_RE.fullmatch(value.strip()):
        raise ValueError(
            f'{value[:40]!r}... is not an OpenSSH public key line ("ssh-ed25519 AAAA... comment")'
        )
    return value.strip()


@publishes(maxLength=CMDLINE_MAX, pattern="^[ -~]*$")
def _check_cmdline(value: str) -> str:
    if len(value) > CMDLINE_MAX:
        raise ValueError(f"must be at most {CMDLINE_MAX} characters")
    if any(not (" " <= ch <= "~") for ch in value):
        raise ValueError("may hold printable ASCII only (no newlines or control characters)")
    return value


def _in_range(low: int, high: int, unit: str) -> AfterValidator:
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be ≥ {low}{unit}")
        if value > high:
            raise ValueError(f"must be ≤ {high}{unit}")
        return value

    VALIDATOR_SCHEMAS[check] = {"minimum": low, "maximum": high}
    return AfterValidator(check)


def at_most(limit: int, what: str) -> BeforeValidator:
    """Refuse an over-long collection before its items are validated: pydantic reports every bad
    item, so 30,000 bad disks would be 30,000 errors and a message megabytes long."""

    def check(value: object) -> object:
        if isinstance(value, list | tuple | dict) and len(value) > limit:
            raise ValueError(f"at most {limit} {what} allowed, not {len(value)}")
        return value

    return BeforeValidator(check)


DnsLabel = Annotated[str, AfterValidator(_check_dns_label)]
ImagePath = Annotated[str, AfterValidator(_check_image_path)]
ImageRef = Annotated[str, AfterValidator(_check_image)]
Sha256Digest = Annotated[str, AfterValidator(_check_digest)]
CloudInitText = Annotated[str, AfterValidator(_check_cloud_init_text)]
CloudInitObject = Annotated[dict[str, Any], AfterValidator(_check_cloud_init_object)]
SshAuthorizedKey = Annotated[str, AfterValidator(_check_ssh_key)]
KernelCmdline = Annotated[str, AfterValidator(_check_cmdline)]
MemoryMiB = Annotated[
    int,
    BeforeValidator(quantity.parse_mebibytes, json_schema_input_type=int | str),
    _in_range(MEMORY_MIN_MIB, MEMORY_MAX_MIB, " MiB"),
]
DiskMiB = Annotated[
    int,
    BeforeValidator(quantity.parse_mebibytes, json_schema_input_type=int | str),
    _in_range(1, DISK_MAX_MIB, " MiB"),
]
Seconds = Annotated[
    int,
    BeforeValidator(quantity.parse_seconds, json_schema_input_type=int | str),
    _in_range(0, STOP_TIMEOUT_MAX_SECONDS, " s"),
]
# Strict: "80" or 80.0 in a manifest is a mistake worth reporting, not a value to coerce.
Port = Annotated[int, Strict(), _in_range(1, 65535, "")]
UnprivilegedPort = Annotated[int, Strict(), _in_range(1024, 65535, "")]
CpuCount = Annotated[int, Strict(), _in_range(1, CPUS_MAX, "")]


# instancetypes: references to instance types and preferences (api/instancetypes.py,
# docs/instancetypes.md). Their names may hold dots ("u1.small"), as KubeVirt's do.
INSTANCE_TYPE_KIND = "QemuInstanceType"
CLUSTER_INSTANCE_TYPE_KIND = "QemuClusterInstanceType"
PREFERENCE_KIND = "QemuPreference"
CLUSTER_PREFERENCE_KIND = "QemuClusterPreference"
TYPE_NAME_MAX = 63
TYPE_NAME_PATTERN = "[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?"
_TYPE_NAME_RE = re.compile(TYPE_NAME_PATTERN)


@publishes(maxLength=TYPE_NAME_MAX, pattern=anchored(TYPE_NAME_PATTERN))
def check_type_name(value: str) -> str:
    if not _TYPE_NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value[: names.QUOTED_MAX]!r} must be at most {TYPE_NAME_MAX} lowercase letters, digits, "
            "'-' and '.', starting and ending with a letter or digit"
        )
    return value


TypeName = Annotated[str, AfterValidator(check_type_name)]


def describe_validation_error(error: ValidationError, *, prefix: str = "") -> str:
    """Render pydantic errors as `spec.memory: must be ≥ 16 MiB; ...` for conditions and 4xx.

    At most ERRORS_SHOWN_MAX errors are listed and the rest counted, so a message stays short
    enough for a condition and a table however wrong the input is.
    """
    parts = []
    errors = error.errors(include_url=False)
    for item in errors[:ERRORS_SHOWN_MAX]:
        location = prefix
        for segment in item["loc"]:
            if isinstance(segment, int):
                location += f"[{segment}]"
            else:
                location += f".{segment}" if location else str(segment)
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    if len(errors) > ERRORS_SHOWN_MAX:
        parts.append(f"and {len(errors) - ERRORS_SHOWN_MAX} more errors")
    return "; ".join(parts)
