"""VALR adapter: recorded bodies under tests/data/exchanges/valr -> Tick or a typed error."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.errors import AdapterError, ExchangeError, FeedError
from feeds import valr

DATA = Path(__file__).parent / "data" / "exchanges" / "valr"


def body(name: str) -> bytes:
    return (DATA / name).read_bytes()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "summary_ok.json",
            {
                "pair": "BTC-ZAR",
                "bid": "1700000",
                "ask": "1700100",
                "last": "1700050",
                "volume_24h": "48.12345678",
                "ts": "2026-11-30T11:00:00.123Z",
            },
        ),
        (
            "summary_offset_created.json",
            {
                "pair": "ETH-ZAR",
                "bid": "60000.5",
                "ask": "60010",
                "last": "1700050",
                "volume_24h": "48.12345678",
                "ts": "2026-11-30T11:00:00.500Z",
            },
        ),
        (
            # The docs say ``created`` is UTC, so a missing offset is read as UTC.
            "summary_naive_created.json",
            {
                "pair": "BTC-ZAR",
                "bid": "1700000",
                "ask": "1700100",
                "last": "1700050",
                "volume_24h": "48.12345678",
                "ts": "2026-11-30T11:00:00.123Z",
            },
        ),
    ],
)
def test_parse_ticker_maps_documented_fields(name: str, expected: dict[str, str]) -> None:
    tick = valr.parse_ticker(body(name))
    assert tick.to_wire() == {"exchange": "valr", **expected, "seq": 0}


@pytest.mark.parametrize(
    ("name", "error", "mentions"),
    [
        ("error_invalid_pair.json", ExchangeError, "Currency pair not found"),
        ("not_json.txt", AdapterError, "body is not JSON"),
        ("summaries_ok.json", AdapterError, "expected a JSON object, got list"),
        ("summary_float_ask.json", AdapterError, "askPrice: expected a decimal string, got float"),
        ("summary_missing_created.json", AdapterError, "created: Field required"),
        ("summary_bad_created.json", AdapterError, "created: not ISO-8601: 'yesterday'"),
        ("summary_nan_last.json", AdapterError, "lastTradedPrice: not a non-negative plain decimal"),
        ("summary_empty_volume.json", AdapterError, "baseVolume: not a non-negative plain decimal"),
    ],
)
def test_parse_ticker_rejects(name: str, error: type[FeedError], mentions: str) -> None:
    with pytest.raises(FeedError) as info:
        valr.parse_ticker(body(name))
    assert type(info.value) is error
    assert info.value.exchange == "valr"
    assert mentions in str(info.value)


def test_error_body_code_is_kept() -> None:
    with pytest.raises(ExchangeError) as info:
        valr.parse_ticker(body("error_invalid_pair.json"))
    assert info.value.code == "-1"


def test_parse_tickers_skips_symbols_without_a_canonical_pair() -> None:
    ticks = valr.parse_tickers(body("summaries_ok.json"))
    got = [(t.pair, t.bid, t.ask, t.last, t.volume_24h, t.to_wire()["ts"]) for t in ticks]
    assert got == [
        ("BTC-ZAR", "1700000", "1700100", "1700050", "48.12345678", "2026-11-30T11:00:00.123Z"),
        ("USDT-ZAR", "18.2", "18.21", "18.205", "1000000", "2026-11-30T11:00:01.000Z"),
    ]


@pytest.mark.parametrize(
    ("name", "error", "mentions"),
    [
        ("error_invalid_pair.json", ExchangeError, "Currency pair not found"),
        ("not_json.txt", AdapterError, "body is not JSON"),
        ("summaries_object.json", AdapterError, "expected a JSON list of market summaries, got dict"),
        ("summaries_bad_entry.json", AdapterError, "1.bidPrice: expected a decimal string, got NoneType"),
    ],
)
def test_parse_tickers_rejects(name: str, error: type[FeedError], mentions: str) -> None:
    with pytest.raises(FeedError) as info:
        valr.parse_tickers(body(name))
    assert type(info.value) is error
    assert mentions in str(info.value)


@pytest.mark.parametrize(
    ("base_url", "pair", "expected"),
    [
        ("https://api.valr.com", "BTCZAR", "https://api.valr.com/v1/public/BTCZAR/marketsummary"),
        ("https://api.valr.com/", "USDTZAR", "https://api.valr.com/v1/public/USDTZAR/marketsummary"),
        ("http://127.0.0.1:9", "A/B", "http://127.0.0.1:9/v1/public/A%2FB/marketsummary"),
    ],
)
def test_ticker_url(base_url: str, pair: str, expected: str) -> None:
    assert valr.ticker_url(base_url, pair) == expected


@pytest.mark.parametrize("base_url", ["https://api.valr.com", "https://api.valr.com/"])
def test_tickers_url(base_url: str) -> None:
    assert valr.tickers_url(base_url) == "https://api.valr.com/v1/public/marketsummary"
