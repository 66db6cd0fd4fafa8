"""Canonical pair names, the one rule every exchange's symbol goes through.

Rule: a pair is ``BASE-QUOTE`` in upper case (``BTC-ZAR``, ``USDT-NGN``). An exchange
symbol is upper-cased, any ``-``, ``_`` or ``/`` separator is honoured, otherwise the quote
is the longest known quote currency that ends the symbol. Aliases are applied to each side
afterwards: Luno's ``XBT`` is ``BTC``. So ``XBTZAR`` (Luno), ``BTCZAR`` (VALR) and
``btcngn`` (Quidax) become ``BTC-ZAR``, ``BTC-ZAR`` and ``BTC-NGN``.
"""

from __future__ import annotations

import re

from bridge.errors import AdapterError

__all__ = ["QUOTE_CURRENCIES", "canonical_pair", "is_canonical_pair", "split_pair"]

# Longest first, so USDT wins over USD in "BTCUSDT".
QUOTE_CURRENCIES: tuple[str, ...] = tuple(
    sorted(
        {
            "ZAR",
            "NGN",
            "KES",
            "UGX",
            "GHS",
            "TZS",
            "ZMW",
            "XOF",
            "EGP",
            "MAD",
            "RWF",
            "USDT",
            "USDC",
            "USD",
            "EUR",
            "GBP",
            "MYR",
            "IDR",
            "BTC",
            "XBT",
            "ETH",
        },
        key=lambda c: (-len(c), c),
    )
)
_ALIASES = {"XBT": "BTC"}
_CURRENCY = re.compile(r"^[A-Z0-9]{2,10}$")
_CANONICAL = re.compile(r"^[A-Z0-9]{2,10}-[A-Z0-9]{2,10}$")
_SEPARATORS = re.compile(r"[-_/]")


def split_pair(symbol: str, *, exchange: str = "pair") -> tuple[str, str]:
    """Return ``(base, quote)`` for an exchange symbol, aliases applied."""
    raw = symbol.strip().upper()
    parts = _SEPARATORS.split(raw)
    if len(parts) == 2:
        base, quote = parts
    elif len(parts) == 1:
        quote = next((q for q in QUOTE_CURRENCIES if raw.endswith(q) and len(raw) > len(q)), "")
        if not quote:
            raise AdapterError(exchange, f"cannot split pair {symbol!r}: unknown quote currency")
        base = raw[: -len(quote)]
    else:
        raise AdapterError(exchange, f"cannot split pair {symbol!r}")
    base, quote = _ALIASES.get(base, base), _ALIASES.get(quote, quote)
    if not (_CURRENCY.match(base) and _CURRENCY.match(quote)):
        raise AdapterError(exchange, f"invalid pair {symbol!r}")
    return base, quote


def canonical_pair(symbol: str, *, exchange: str = "pair") -> str:
    """``XBTZAR`` -> ``BTC-ZAR``; see the module docstring for the rule."""
    base, quote = split_pair(symbol, exchange=exchange)
    return f"{base}-{quote}"


def is_canonical_pair(pair: str) -> bool:
    return bool(_CANONICAL.match(pair))
