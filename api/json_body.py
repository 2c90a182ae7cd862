"""Decoding backend bodies (states, lock info): strict JSON, fast, and in pieces when large.

Pure. msgspec parses a few times faster than the stdlib and refuses everything a body must not
hold (invalid UTF-8, a BOM, unpaired surrogate escapes, integers past 4300 digits) plus a little
more (NaN, Infinity, 1e400, and negative integers of exactly 4300 digits). Whatever it refuses
goes to the stdlib parser, which says why in the words clients have always seen, or reads the
few documents only it accepts exactly as before: the outcome of every body is the stdlib's.

A large state is decoded piece by piece (its top-level values, each resource's values, each
resource instance) rather than in one C call: a thread decoding it then gives the GIL back to
the event loop between pieces, so a 40 MB state does not stall every other request for the
whole parse (docs/backend.md#the-state-document describes the layout).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

# Below this a single C call holds the GIL for about a millisecond; above, splitting pays for
# its second scan of the bytes with event-loop latency.
PIECEWISE_DECODE_BYTES = 1024 * 1024
# A lone surrogate can only come from a \uD800-\uDFFF escape (the body is strict UTF-8), so
# the document is walked for one only when the text holds such an escape.
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")

_ANY = msgspec.json.Decoder()
_OBJECT_OF_RAW = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ARRAY_OF_RAW = msgspec.json.Decoder(list[msgspec.Raw])
Piece = Callable[[msgspec.Raw | bytes], Any]


class StateFormatError(ValueError):
    """A backend body (a state, or lock info) no Terraform or OpenTofu client could have written."""


def load_json(body: bytes, *, what: str) -> Any:
    """Decode a backend body, with each way it can fail (or succeed with something no store can
    hold) turned into a StateFormatError that starts with `what` and says why.

    :raise StateFormatError: not UTF-8 JSON, nested past the parser's recursion limit, an
        integer past its digit limit, or a string with an unpaired surrogate escape.
    """
    return decode_json(body, what=what)[0]


def decode_json(body: bytes, *, what: str) -> tuple[Any, bool]:
    """`load_json`, also saying whether the strict parser alone read the body (then every
    number in it is finite). :raise StateFormatError: as load_json."""
    try:
        if len(body) >= PIECEWISE_DECODE_BYTES:
            return _state_in_pieces(body), True
        return _ANY.decode(body), True
    except (msgspec.DecodeError, RecursionError):
        return _decode_stdlib(body, what=what), False


def _decode_stdlib(body: bytes, *, what: str) -> Any:
    try:
        # Strict UTF-8 first: json.loads(bytes) would also take UTF-16, a BOM and raw surrogate
        # bytes, none of which a Go client writes or could read back.
        text = body.decode()
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateFormatError(f"{what} is not valid JSON: {err}") from err
    except RecursionError as err:
        raise StateFormatError(f"{what} is nested too deeply to parse") from err
    except ValueError as err:
        # The one other ValueError json.loads raises: an integer past int_max_str_digits.
        limit = sys.get_int_max_str_digits()
        raise StateFormatError(f"{what} holds a number with more than {limit} digits") from err
    if _SURROGATE_ESCAPE_RE.search(text) and holds_lone_surrogate(document):
        raise StateFormatError(
            f"{what} holds a string that is not valid Unicode (an unpaired \\ud800-\\udfff escape)"
        )
    return document


def _object(raw: msgspec.Raw | bytes, fields: Mapping[str, Piece]) -> Any:
    """An object whose named fields are decoded by their own piece, the rest whole. Only the
    leaves' decoding is strict (a Raw value is skipped, not checked), and every byte of the
    body lies in one leaf: the split documents are refused exactly like the whole."""
    try:
        items = _OBJECT_OF_RAW.decode(raw)
    except msgspec.ValidationError:
        return _ANY.decode(raw)  # not an object: decoded whole, whatever it is
    return {key: fields.get(key, _ANY.decode)(value) for key, value in items.items()}


def _array(raw: msgspec.Raw | bytes, item: Piece) -> Any:
    try:
        items = _ARRAY_OF_RAW.decode(raw)
    except msgspec.ValidationError:
        return _ANY.decode(raw)
    return [item(value) for value in items]


def _instances(raw: msgspec.Raw | bytes) -> Any:
    return _array(raw, _ANY.decode)


def _resource(raw: msgspec.Raw | bytes) -> Any:
    return _object(raw, {"instances": _instances})


def _resources(raw: msgspec.Raw | bytes) -> Any:
    return _array(raw, _resource)


def _state_in_pieces(body: bytes) -> Any:
    return _object(body, {"resources": _resources})


def holds_lone_surrogate(value: object) -> bool:
    """Whether a JSON value holds a string (or key) that UTF-8 cannot encode: JSON's `\\ud800`
    escape can write one, and SQLite, HTTP and logs then fail on it. Walks without recursion."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return False


def nesting_exceeds(value: object, limit: int) -> bool:
    """Whether a JSON value nests containers more than `limit` deep. Walks without recursion."""
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children: Any
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def drop_nulls(value: object) -> object:
    """HCL optional attributes arrive as null; null means "use the default" in a manifest."""
    if isinstance(value, dict):
        return {key: drop_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [drop_nulls(item) for item in value]
    return value
