"""Luno adapter: recorded bodies under tests/data/exchanges/luno -> Tick or a typed error."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.errors import AdapterError, ExchangeError, FeedError
from feeds import luno

DATA = Path(__file__).parent / "data" / "exchanges" / "luno"


def body(name: str) -> bytes:
    return (DATA / name).read_bytes()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "ticker_ok.json",
            {
                "pair": "BTC-NGN",
                "bid": "12579999",
                "ask": "12580000",
                "last": "12560699",
                "volume_24h": "205.511076",
                "ts": "2020-12-29T11:36:57.077Z",
            },
        ),
        (
            "ticker_postonly.json",
            {
                "pair": "BTC-ZAR",
                "bid": "0.5",
                "ask": "1",
                "last": "0.75",
                "volume_24h": "0",
                "ts": "2020-12-29T11:36:57.077Z",
            },
        ),
        (
            "ticker_no_status.json",
            {
                "pair": "BTC-NGN",
                "bid": "12579999",
                "ask": "12580000",
                "last": "12560699",
                "volume_24h": "205.511076",
                "ts": "2020-12-29T11:36:57.077Z",
            },
        ),
    ],
)
def test_parse_ticker_maps_documented_fields(name: str, expected: dict[str, str]) -> None:
    tick = luno.parse_ticker(body(name))
    assert tick.to_wire() == {"exchange": "luno", **expected, "seq": 0}


def test_parse_ticker_accepts_text_bodies() -> None:
    assert luno.parse_ticker(body("ticker_ok.json").decode()) == luno.parse_ticker(body("ticker_ok.json"))


@pytest.mark.parametrize(
    ("name", "error", "mentions"),
    [
        ("error_invalid_pair.json", ExchangeError, "Invalid currency pair."),
        ("ticker_disabled.json", ExchangeError, "XBTNGN is disabled"),
        ("not_json.html", AdapterError, "body is not JSON"),
        ("ticker_list_body.json", AdapterError, "expected a JSON object, got list"),
        ("ticker_float_bid.json", AdapterError, "bid: expected a decimal string, got float"),
        ("ticker_int_ask.json", AdapterError, "ask: expected a decimal string, got int"),
        ("ticker_missing_ask.json", AdapterError, "ask: Field required"),
        ("ticker_negative_bid.json", AdapterError, "bid: not a non-negative plain decimal"),
        ("ticker_exponent_last.json", AdapterError, "last_trade: not a non-negative plain decimal"),
        ("ticker_timestamp_string.json", AdapterError, "timestamp: Input should be a valid integer"),
        ("ticker_unknown_pair.json", AdapterError, "cannot split pair 'XBTQQQ'"),
    ],
)
def test_parse_ticker_rejects(name: str, error: type[FeedError], mentions: str) -> None:
    with pytest.raises(FeedError) as info:
        luno.parse_ticker(body(name))
    assert type(info.value) is error
    assert info.value.exchange == "luno"
    assert mentions in str(info.value)


@pytest.mark.parametrize(
    ("name", "code"),
    [("error_invalid_pair.json", "ErrInvalidPair"), ("ticker_disabled.json", luno.DISABLED)],
)
def test_exchange_errors_carry_a_code(name: str, code: str) -> None:
    with pytest.raises(ExchangeError) as info:
        luno.parse_ticker(body(name))
    assert info.value.code == code


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "tickers_ok.json",
            [
                ("BTC-ZAR", "1700000", "1700100", "1700050", "12.3456", "2025-11-30T11:00:00.123Z"),
                ("ETH-ZAR", "60000.1", "60010", "60005", "100", "2025-11-30T11:00:00.456Z"),
            ],
        ),
        ("tickers_empty.json", []),
    ],
)
def test_parse_tickers_skips_disabled_markets(
    name: str, expected: list[tuple[str, str, str, str, str, str]]
) -> None:
    ticks = luno.parse_tickers(body(name))
    got = [(t.pair, t.bid, t.ask, t.last, t.volume_24h, t.to_wire()["ts"]) for t in ticks]
    assert got == expected
    assert all(t.exchange == "luno" and t.seq == 0 for t in ticks)


@pytest.mark.parametrize(
    ("name", "error", "mentions"),
    [
        ("error_invalid_pair.json", ExchangeError, "Invalid currency pair."),
        ("not_json.html", AdapterError, "body is not JSON"),
        ("ticker_ok.json", AdapterError, "tickers: Field required"),
        ("tickers_not_list.json", AdapterError, "tickers: Input should be a valid list"),
        (
            "tickers_bad_entry.json",
            AdapterError,
            "tickers.1.rolling_24_hour_volume: expected a decimal string",
        ),
    ],
)
def test_parse_tickers_rejects(name: str, error: type[FeedError], mentions: str) -> None:
    with pytest.raises(FeedError) as info:
        luno.parse_tickers(body(name))
    assert type(info.value) is error
    assert mentions in str(info.value)


@pytest.mark.parametrize(
    ("base_url", "pair", "expected"),
    [
        ("https://api.luno.com", "XBTZAR", "https://api.luno.com/api/1/ticker?pair=XBTZAR"),
        ("https://api.luno.com/", "ETHNGN", "https://api.luno.com/api/1/ticker?pair=ETHNGN"),
        ("http://127.0.0.1:8080", "A&B", "http://127.0.0.1:8080/api/1/ticker?pair=A%26B"),
    ],
)
def test_ticker_url(base_url: str, pair: str, expected: str) -> None:
    assert luno.ticker_url(base_url, pair) == expected


@pytest.mark.parametrize("base_url", ["https://api.luno.com", "https://api.luno.com/"])
def test_tickers_url(base_url: str) -> None:
    assert luno.tickers_url(base_url) == "https://api.luno.com/api/1/tickers"
