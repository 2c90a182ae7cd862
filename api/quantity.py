"""Parsing of sizes and durations as users write them in HCL.

Memory and disk sizes are integers of MiB or Kubernetes-style quantities ("512Mi", "2Gi");
durations are integers of seconds or Go-style strings ("90s", "1m30s"). Both are normalised
to integers so that `512` and `"512Mi"` produce the same canonical spec (and no new generation).
"""

from __future__ import annotations

import re

_MIB = 1024 * 1024
_BINARY_SUFFIX_BYTES = {
    "Ki": 1024,
    "Mi": _MIB,
    "Gi": 1024 * _MIB,
    "Ti": 1024 * 1024 * _MIB,
}
_DECIMAL_SUFFIX_BYTES = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_QUANTITY_RE = re.compile(r"(?P<number>[0-9]{1,15})(?P<suffix>Ki|Mi|Gi|Ti|K|M|G|T)?")
_DURATION_PART_RE = re.compile(r"([0-9]{1,6})(h|m|s)")
_DURATION_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}


def parse_mebibytes(value: object) -> int:
    """Return `value` as a whole number of MiB.

    :raise ValueError: with a message fit for a user, for anything that is not an integer of
        MiB or a quantity string that is a whole number of MiB.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f'must be an integer of MiB or a quantity like "512Mi", not {value!r}')
    if isinstance(value, int):
        return value
    match = _QUANTITY_RE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f'{value[:40]!r} is not a quantity: write e.g. 512, "512Mi" or "2Gi"')
    number, suffix = int(match["number"]), match["suffix"]
    if suffix is None:
        return number
    unit = _BINARY_SUFFIX_BYTES.get(suffix) or _DECIMAL_SUFFIX_BYTES[suffix]
    total_bytes = number * unit
    if total_bytes % _MIB:
        raise ValueError(f"{value!r} is not a whole number of MiB")
    return total_bytes // _MIB


def parse_seconds(value: object) -> int:
    """Return `value` as whole seconds: an integer, or a duration such as "90s" or "1m30s".

    :raise ValueError: with a message fit for a user.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f'must be whole seconds or a duration like "30s", not {value!r}')
    if isinstance(value, int):
        return value
    text = value.strip()
    # isascii: str.isdigit() is also true for "²" and "١٢٣", which are no way to write seconds.
    if text.isascii() and text.isdigit() and len(text) <= 6:
        return int(text)
    parts = _DURATION_PART_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f'{value[:40]!r} is not a duration: write e.g. 30, "30s" or "2m"')
    return sum(int(number) * _DURATION_UNIT_SECONDS[unit] for number, unit in parts)
