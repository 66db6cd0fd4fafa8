"""Quidax ticker bodies -> :class:`~bridge.core.tick.Tick` (pure: no I/O).

Endpoints: ``GET /api/v1/markets/tickers/btcngn`` (one market) and
``GET /api/v1/markets/tickers`` (all markets, ``data`` keyed by market). Both wrap the
payload as ``{"status": "success", "message": ..., "data": ...}``; any other status is an
ExchangeError. Field mapping: ``ticker.buy`` -> ``bid``, ``ticker.sell`` -> ``ask``,
``ticker.last`` -> ``last``, ``ticker.vol`` -> ``volume_24h``, ``at`` -> ``ts``.

``at`` has been seen both in seconds and in milliseconds. Values above 1e11 are read as
milliseconds: 1e11 s is the year 5138, while 1e11 ms is 1973, so the ranges cannot overlap
for any real tick.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from bridge.core.tick import Tick
from bridge.errors import AdapterError, ExchangeError
from feeds.pairs import canonical_pair
from feeds.parsing import load_json, normalise_decimal, shape_error, utc_from_millis

__all__ = [
    "EXCHANGE",
    "MIN_INTERVAL_S",
    "MS_THRESHOLD",
    "RATE_BURST",
    "parse_ticker",
    "parse_tickers",
    "ticker_time",
    "ticker_url",
    "tickers_url",
]

EXCHANGE: Final = "quidax"
# Our polite default (one call a second, no burst): Quidax publishes no public-API figure.
MIN_INTERVAL_S: Final = 1.0
RATE_BURST: Final = 1
MS_THRESHOLD: Final = 100_000_000_000
SUCCESS: Final = "success"


class _Prices(BaseModel):
    model_config = ConfigDict(extra="allow")

    # Left as ``object`` so normalise_decimal is the one place that judges decimals.
    buy: object
    sell: object
    last: object
    vol: object


class _MarketTicker(BaseModel):
    model_config = ConfigDict(extra="allow")

    at: Annotated[StrictInt, Field(gt=0)]
    ticker: _Prices


class _SingleTicker(_MarketTicker):
    market: StrictStr


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: StrictStr
    message: object = None
    data: object = None


class _Single(_Envelope):
    data: _SingleTicker


class _All(_Envelope):
    data: dict[str, _MarketTicker]


def ticker_url(base_url: str, pair: str) -> str:
    """``https://www.quidax.com`` + ``btcngn`` -> ``.../api/v1/markets/tickers/btcngn``."""
    return f"{base_url.rstrip('/')}/api/v1/markets/tickers/{quote(pair.lower(), safe='')}"


def tickers_url(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/api/v1/markets/tickers"


def parse_ticker(body: bytes | str) -> Tick:
    """One market's body -> Tick; a non-success status raises ExchangeError."""
    data = _load(body)
    try:
        single = _Single.model_validate(data).data
    except ValidationError as exc:
        raise shape_error(exc, exchange=EXCHANGE) from None
    return _to_tick(single.market, single, where="data.")


def parse_tickers(body: bytes | str) -> list[Tick]:
    """The all-markets body -> one Tick per market key."""
    data = _load(body)
    try:
        markets = _All.model_validate(data).data
    except ValidationError as exc:
        raise shape_error(exc, exchange=EXCHANGE) from None
    # The key names the market: the inner object need not repeat it.
    return [_to_tick(market, item, where=f"data.{market}.") for market, item in markets.items()]


def _load(body: bytes | str) -> Any:
    data = load_json(body, exchange=EXCHANGE)
    if not isinstance(data, dict):
        raise AdapterError(EXCHANGE, f"expected a JSON object, got {type(data).__name__}")
    status = data.get("status")
    if status is None:
        raise AdapterError(EXCHANGE, "status: Field required")
    if status != SUCCESS:
        message = data.get("message")
        raise ExchangeError(
            EXCHANGE,
            str(message) if message else f"status {status!r}",
            code=status if isinstance(status, str) else str(status),
        )
    return data


def ticker_time(at: int, *, field: str = "at") -> datetime:
    """``at`` in seconds or milliseconds (see the module docstring) -> aware UTC datetime."""
    millis = at if at > MS_THRESHOLD else at * 1000
    return utc_from_millis(millis, exchange=EXCHANGE, field=field)


def _to_tick(market: str, item: _MarketTicker, *, where: str) -> Tick:
    def decimal(field: str, value: object) -> str:
        return normalise_decimal(value, exchange=EXCHANGE, field=f"{where}ticker.{field}")

    return Tick(
        exchange=EXCHANGE,
        pair=canonical_pair(market, exchange=EXCHANGE),
        bid=decimal("buy", item.ticker.buy),
        ask=decimal("sell", item.ticker.sell),
        last=decimal("last", item.ticker.last),
        volume_24h=decimal("vol", item.ticker.vol),
        ts=ticker_time(item.at, field=f"{where}at"),
    )
