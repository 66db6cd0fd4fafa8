"""canonical_pair: every exchange's symbol spelling -> BASE-QUOTE."""

from __future__ import annotations

import pytest

from bridge.errors import AdapterError
from feeds.pairs import QUOTE_CURRENCIES, canonical_pair, is_canonical_pair, split_pair


@pytest.mark.parametrize(
    ("symbol", "expected"),
    [
        ("XBTZAR", "BTC-ZAR"),  # Luno calls bitcoin XBT
        ("XBTNGN", "BTC-NGN"),
        ("ETHZAR", "ETH-ZAR"),
        ("USDCNGN", "USDC-NGN"),
        ("ETHXBT", "ETH-BTC"),  # the alias applies to the quote too
        ("BTCZAR", "BTC-ZAR"),  # VALR
        ("USDTZAR", "USDT-ZAR"),
        ("btcngn", "BTC-NGN"),  # Quidax is lower case
        ("usdtngn", "USDT-NGN"),
        ("BTCUSDT", "BTC-USDT"),  # longest quote wins over USD
        ("BTC-ZAR", "BTC-ZAR"),  # already canonical
        ("btc_usdt", "BTC-USDT"),
        ("eth/btc", "ETH-BTC"),
        ("XBT-ZAR", "BTC-ZAR"),
        (" xbtzar ", "BTC-ZAR"),
    ],
)
def test_canonical_pair(symbol: str, expected: str) -> None:
    assert canonical_pair(symbol) == expected
    assert is_canonical_pair(expected)


@pytest.mark.parametrize(
    ("symbol", "mentions"),
    [
        ("ZAR", "unknown quote currency"),  # a quote alone is not a pair
        ("", "unknown quote currency"),
        ("BTCPERP", "unknown quote currency"),
        ("BTCUSDTPERP", "unknown quote currency"),
        ("BTC-ZAR-X", "cannot split pair"),
        ("A-B", "invalid pair"),
        ("B!C-ZAR", "invalid pair"),
    ],
)
def test_canonical_pair_refuses(symbol: str, mentions: str) -> None:
    with pytest.raises(AdapterError) as info:
        canonical_pair(symbol, exchange="valr")
    assert info.value.exchange == "valr"
    assert mentions in str(info.value)


def test_split_pair_returns_base_and_quote() -> None:
    assert split_pair("XBTZAR") == ("BTC", "ZAR")


def test_quotes_are_longest_first() -> None:
    lengths = [len(quote) for quote in QUOTE_CURRENCIES]
    assert lengths == sorted(lengths, reverse=True)


@pytest.mark.parametrize(
    ("pair", "expected"),
    [("BTC-ZAR", True), ("USDT-NGN", True), ("btc-zar", False), ("BTCZAR", False), ("B-ZAR", False)],
)
def test_is_canonical_pair(pair: str, expected: bool) -> None:
    assert is_canonical_pair(pair) is expected
