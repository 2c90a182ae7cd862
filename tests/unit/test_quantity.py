"""Sizes and durations as users write them."""

from __future__ import annotations

import pytest

from api.quantity import parse_mebibytes, parse_seconds


@pytest.mark.parametrize(
    ("value", "mebibytes"),
    [
        pytest.param(512, 512, id="int-is-mib"),
        pytest.param("512", 512, id="digit-string-is-mib"),
        pytest.param("512Mi", 512, id="mi"),
        pytest.param("2Gi", 2048, id="gi"),
        pytest.param("1Ti", 1024 * 1024, id="ti"),
        pytest.param("2048Ki", 2, id="ki-whole-mib"),
        pytest.param("1048576K", 1000, id="decimal-k"),
        pytest.param(" 1Gi ", 1024, id="surrounding-space"),
    ],
)
def test_parse_mebibytes_accepts(value: object, mebibytes: int) -> None:
    """Integers are MiB and quantities convert to whole MiB."""
    assert parse_mebibytes(value) == mebibytes


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(1.5, "must be an integer of MiB", id="float"),
        pytest.param(True, "must be an integer of MiB", id="bool"),
        pytest.param(None, "must be an integer of MiB", id="null"),
        pytest.param("1.5Gi", "is not a quantity", id="fraction"),
        pytest.param("512MB", "is not a quantity", id="unknown-suffix"),
        pytest.param("-1Gi", "is not a quantity", id="negative"),
        pytest.param("1Ki", "not a whole number of MiB", id="sub-mib"),
        pytest.param("9" * 40, "is not a quantity", id="absurdly-long"),
    ],
)
def test_parse_mebibytes_rejects(value: object, message: str) -> None:
    """Anything that is not a whole number of MiB gets a message that says how to write it."""
    with pytest.raises(ValueError, match=message):
        parse_mebibytes(value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param(30, 30, id="int"),
        pytest.param("45", 45, id="digit-string"),
        pytest.param("90s", 90, id="seconds"),
        pytest.param("2m", 120, id="minutes"),
        pytest.param("1m30s", 90, id="compound"),
        pytest.param("1h", 3600, id="hours"),
    ],
)
def test_parse_seconds_accepts(value: object, seconds: int) -> None:
    """Durations are whole seconds or Go-style strings."""
    assert parse_seconds(value) == seconds


@pytest.mark.parametrize("value", ["30 s", "1.5m", "m", "", "30sx", 2.5, None])
def test_parse_seconds_rejects(value: object) -> None:
    """Malformed durations are refused."""
    with pytest.raises(ValueError, match="duration"):
        parse_seconds(value)
