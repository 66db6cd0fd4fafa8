"""Quidax adapter: recorded bodies under tests/data/exchanges/quidax -> Tick or a typed error."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from bridge.errors import AdapterError, ExchangeError, FeedError
from feeds import quidax

DATA = Path(__file__).parent / "data" / "exchanges" / "quidax"


def body(name: str) -> bytes:
    return (DATA / name).read_bytes()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "ticker_seconds.json",
            {
                "pair": "BTC-NGN",
                "bid": "98000000",
                "ask": "98100000",
                "last": "98050000",
                "volume_24h": "1.2345",
                "ts": "2025-11-30T11:00:00.000Z",
            },
        ),
        (
            "ticker_millis.json",
            {
                "pair": "USDT-NGN",
                "bid": "1650",
                "ask": "1655.5",
                "last": "1652",
                "volume_24h": "250000",
                "ts": "2025-11-30T11:00:00.123Z",
            },
        ),
    ],
)
def test_parse_ticker_maps_documented_fields(name: str, expected: dict[str, str]) -> None:
    tick = quidax.parse_ticker(body(name))
    assert tick.to_wire() == {"exchange": "quidax", **expected, "seq": 0}


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (1764500400, datetime(2025, 11, 30, 11, 0, tzinfo=UTC)),
        (1764500400123, datetime(2025, 11, 30, 11, 0, 0, 123000, tzinfo=UTC)),
        (quidax.MS_THRESHOLD, datetime(5138, 11, 16, 9, 46, 40, tzinfo=UTC)),
        (quidax.MS_THRESHOLD + 1, datetime(1973, 3, 3, 9, 46, 40, 1000, tzinfo=UTC)),
    ],
)
def test_ticker_time_detects_the_unit(at: int, expected: datetime) -> None:
    assert quidax.ticker_time(at) == expected


@pytest.mark.parametrize(
    ("name", "error", "mentions"),
    [
        ("error_not_found.json", ExchangeError, "Market not found"),
        ("not_json.html", AdapterError, "body is not JSON"),
        ("ticker_missing_status.json", AdapterError, "status: Field required"),
        ("ticker_missing_vol.json", AdapterError, "data.ticker.vol: Field required"),
        ("ticker_float_last.json", AdapterError, "data.ticker.last: expected a decimal string, got float"),
        ("ticker_at_string.json", AdapterError, "data.at: Input should be a valid integer"),
        ("ticker_missing_market.json", AdapterError, "data.market: Field required"),
    ],
)
def test_parse_ticker_rejects(name: str, error: type[FeedError], mentions: str) -> None:
    with pytest.raises(FeedError) as info:
        quidax.parse_ticker(body(name))
    assert type(info.value) is error
    assert info.value.exchange == "quidax"
    assert mentions in str(info.value)


def test_non_success_status_is_the_error_code() -> None:
    with pytest.raises(ExchangeError) as info:
        quidax.parse_tickers(body("error_not_found.json"))
    assert info.value.code == "error"


def test_parse_tickers_reads_the_market_from_the_key() -> None:
    ticks = quidax.parse_tickers(body("tickers_ok.json"))
    got = [(t.pair, t.bid, t.ask, t.last, t.volume_24h, t.to_wire()["ts"]) for t in ticks]
    assert got == [
        ("BTC-NGN", "98000000", "98100000", "98050000", "1.2345", "2025-11-30T11:00:00.000Z"),
        ("ETH-NGN", "5000000", "5010000", "5005000", "10.5", "2025-11-30T11:00:00.999Z"),
    ]


@pytest.mark.parametrize(
    ("name", "error", "mentions"),
    [
        ("error_not_found.json", ExchangeError, "Market not found"),
        ("not_json.html", AdapterError, "body is not JSON"),
        ("tickers_data_list.json", AdapterError, "data: Input should be a valid dictionary"),
        ("tickers_bad_entry.json", AdapterError, "data.ethngn.ticker.sell: not a non-negative plain decimal"),
    ],
)
def test_parse_tickers_rejects(name: str, error: type[FeedError], mentions: str) -> None:
    with pytest.raises(FeedError) as info:
        quidax.parse_tickers(body(name))
    assert type(info.value) is error
    assert mentions in str(info.value)


@pytest.mark.parametrize(
    ("base_url", "pair", "expected"),
    [
        ("https://www.quidax.com", "btcngn", "https://www.quidax.com/api/v1/markets/tickers/btcngn"),
        ("https://www.quidax.com/", "USDTNGN", "https://www.quidax.com/api/v1/markets/tickers/usdtngn"),
    ],
)
def test_ticker_url(base_url: str, pair: str, expected: str) -> None:
    assert quidax.ticker_url(base_url, pair) == expected


@pytest.mark.parametrize("base_url", ["https://www.quidax.com", "https://www.quidax.com/"])
def test_tickers_url(base_url: str) -> None:
    assert quidax.tickers_url(base_url) == "https://www.quidax.com/api/v1/markets/tickers"
