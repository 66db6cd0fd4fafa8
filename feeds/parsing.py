"""Turning exchange values into :class:`~bridge.core.tick.Tick` values, shared by every adapter.

Prices arrive as decimal strings (``"12579999.00000000"``); a Tick wants one canonical
spelling per value (``"12579999"``), so payloads compare byte-wise. The rule lives here only.

The module also holds the few helpers each adapter needs around it (JSON decoding, epoch
milliseconds to UTC, and turning a pydantic shape error into an
:class:`~bridge.errors.AdapterError` naming the field), so the three adapters word their
errors the same way.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from pydantic import ValidationError

from bridge.errors import AdapterError

__all__ = [
    "MAX_FRACTION_DIGITS",
    "MAX_INTEGER_DIGITS",
    "load_json",
    "normalise_decimal",
    "shape_error",
    "utc_from_millis",
]

MAX_INTEGER_DIGITS: Final = 30
MAX_FRACTION_DIGITS: Final = 18

# Plain digits only: no sign, exponent, spaces, "NaN"/"Infinity", or a bare "." either side.
# fullmatch, not match + "$": "$" would let a trailing newline through.
_PLAIN_DECIMAL = re.compile(r"([0-9]+)(?:\.([0-9]+))?")


def normalise_decimal(value: object, *, exchange: str, field: str) -> str:
    """``"0012.50"`` -> ``"12.5"``, ``"0.000"`` -> ``"0"``; anything else -> AdapterError.

    Only strings are accepted: a JSON number has already been through a binary float and
    may have lost cents, so we refuse it rather than guess.
    """
    if not isinstance(value, str):
        raise AdapterError(exchange, f"{field}: expected a decimal string, got {type(value).__name__}")
    match = _PLAIN_DECIMAL.fullmatch(value)
    if match is None:
        raise AdapterError(exchange, f"{field}: not a non-negative plain decimal: {value[:40]!r}")
    integer = match.group(1).lstrip("0") or "0"
    fraction = (match.group(2) or "").rstrip("0")
    if len(integer) > MAX_INTEGER_DIGITS:
        raise AdapterError(exchange, f"{field}: more than {MAX_INTEGER_DIGITS} integer digits")
    # Rounding would silently change a price, so too many significant places is an error.
    if len(fraction) > MAX_FRACTION_DIGITS:
        raise AdapterError(exchange, f"{field}: more than {MAX_FRACTION_DIGITS} decimal places")
    return f"{integer}.{fraction}" if fraction else integer


def load_json(body: bytes | str, *, exchange: str) -> Any:
    """Decode a response body; a body that is not JSON is an AdapterError."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterError(exchange, f"body is not JSON: {exc}") from None


def utc_from_millis(millis: int, *, exchange: str, field: str) -> datetime:
    """Epoch milliseconds -> aware UTC datetime, exactly (``ms / 1000`` as a float can lose a ms)."""
    try:
        return datetime.fromtimestamp(millis // 1000, UTC) + timedelta(milliseconds=millis % 1000)
    except (OverflowError, OSError, ValueError):
        raise AdapterError(exchange, f"{field}: timestamp out of range: {millis}") from None


def shape_error(exc: ValidationError, *, exchange: str) -> AdapterError:
    """Name the first offending field, e.g. ``tickers.0.bid: Field required``."""
    first = exc.errors()[0]
    path = ".".join(str(part) for part in first["loc"])
    return AdapterError(exchange, f"{path or 'body'}: {first['msg']}")
