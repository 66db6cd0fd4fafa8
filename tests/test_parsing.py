"""The one decimal normaliser (and its neighbours) every adapter goes through."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, StrictInt, ValidationError

from bridge.errors import AdapterError
from feeds.parsing import load_json, normalise_decimal, shape_error, utc_from_millis

# The Tick's own decimal pattern: whatever we return must pass it.
TICK_DECIMAL = re.compile(r"^(0|[1-9][0-9]{0,29})(\.[0-9]{1,18})?$")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("12579999.00000000", "12579999"),
        ("0.50", "0.5"),
        ("0", "0"),
        ("0.000", "0"),
        ("000", "0"),
        ("00.10", "0.1"),
        ("000123.4500", "123.45"),
        ("10", "10"),
        ("100.00", "100"),
        ("205.51107600", "205.511076"),
        ("1.000000000000000001", "1.000000000000000001"),
        ("0.100000000000000000000000", "0.1"),
        ("9" * 30, "9" * 30),
        ("0000" + "9" * 30 + ".5", "9" * 30 + ".5"),
    ],
)
def test_normalises_to_one_spelling(value: str, expected: str) -> None:
    got = normalise_decimal(value, exchange="luno", field="bid")
    assert got == expected
    assert TICK_DECIMAL.match(got)


@pytest.mark.parametrize(
    ("value", "mentions"),
    [
        (1.5, "expected a decimal string, got float"),
        (1, "expected a decimal string, got int"),
        (True, "expected a decimal string, got bool"),
        (None, "expected a decimal string, got NoneType"),
        (Decimal("1.5"), "expected a decimal string, got Decimal"),
        ("", "not a non-negative plain decimal"),
        ("-1", "not a non-negative plain decimal"),
        ("-0", "not a non-negative plain decimal"),
        ("+1", "not a non-negative plain decimal"),
        ("1e5", "not a non-negative plain decimal"),
        ("1E-3", "not a non-negative plain decimal"),
        ("NaN", "not a non-negative plain decimal"),
        ("Infinity", "not a non-negative plain decimal"),
        (".5", "not a non-negative plain decimal"),
        ("5.", "not a non-negative plain decimal"),
        ("1,000.00", "not a non-negative plain decimal"),
        ("1_000", "not a non-negative plain decimal"),
        (" 1", "not a non-negative plain decimal"),
        ("1 ", "not a non-negative plain decimal"),
        ("1.5\n", "not a non-negative plain decimal"),
        ("0x10", "not a non-negative plain decimal"),
        ("\u0661\u0662", "not a non-negative plain decimal"),  # Arabic-Indic digits
        ("1.0000000000000000001", "more than 18 decimal places"),
        ("1" * 31, "more than 30 integer digits"),
    ],
)
def test_refuses_anything_but_a_plain_decimal_string(value: object, mentions: str) -> None:
    with pytest.raises(AdapterError) as info:
        normalise_decimal(value, exchange="valr", field="askPrice")
    assert info.value.exchange == "valr"
    assert str(info.value).startswith("valr: askPrice: ")
    assert mentions in str(info.value)


@given(
    integer=st.integers(min_value=0, max_value=10**30 - 1),
    fraction=st.text(alphabet="0123456789", max_size=18),
    leading=st.integers(min_value=0, max_value=3),
    trailing=st.integers(min_value=0, max_value=6),
)
def test_value_is_kept_and_spelling_is_canonical(
    integer: int, fraction: str, leading: int, trailing: int
) -> None:
    text = "0" * leading + str(integer) + ("." + fraction + "0" * trailing if fraction or trailing else "")
    got = normalise_decimal(text, exchange="quidax", field="vol")
    assert Decimal(got) == Decimal(text)
    assert TICK_DECIMAL.match(got)
    assert normalise_decimal(got, exchange="quidax", field="vol") == got


@pytest.mark.parametrize(
    ("millis", "expected"),
    [
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
        # 1609241817077 / 1000 as a float is 1609241817.0769999..., which would truncate to .076.
        (1609241817077, datetime(2020, 12, 29, 11, 36, 57, 77000, tzinfo=UTC)),
        (1764500400999, datetime(2025, 11, 30, 11, 0, 0, 999000, tzinfo=UTC)),
    ],
)
def test_utc_from_millis_is_exact(millis: int, expected: datetime) -> None:
    assert utc_from_millis(millis, exchange="luno", field="timestamp") == expected


def test_utc_from_millis_out_of_range() -> None:
    with pytest.raises(AdapterError, match="timestamp: timestamp out of range"):
        utc_from_millis(10**20, exchange="luno", field="timestamp")


@pytest.mark.parametrize(("body", "expected"), [(b'{"a": "1"}', {"a": "1"}), ("[1]", [1])])
def test_load_json(body: bytes | str, expected: object) -> None:
    assert load_json(body, exchange="luno") == expected


@pytest.mark.parametrize("body", [b"<html>", b"\xff\xfe", "", "{"])
def test_load_json_refuses_non_json(body: bytes | str) -> None:
    with pytest.raises(AdapterError, match=r"^luno: body is not JSON"):
        load_json(body, exchange="luno")


class _Shape(BaseModel):
    items: list[StrictInt]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "luno: items: Field required"),
        ({"items": [1, "x"]}, "luno: items.1: Input should be a valid integer"),
        ([], "luno: body: Input should be a valid dictionary or instance of _Shape"),
    ],
)
def test_shape_error_names_the_field(data: object, expected: str) -> None:
    with pytest.raises(ValidationError) as info:
        _Shape.model_validate(data)
    assert str(shape_error(info.value, exchange="luno")) == expected
