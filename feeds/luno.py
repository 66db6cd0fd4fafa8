"""Luno ticker bodies -> :class:`~bridge.core.tick.Tick` (pure: no I/O).

Endpoints: ``GET /api/1/ticker?pair=XBTZAR`` (one market) and ``GET /api/1/tickers``
(``{"tickers": [...]}``). Field mapping: ``bid``/``ask`` as is, ``last_trade`` -> ``last``,
``rolling_24_hour_volume`` -> ``volume_24h``, ``timestamp`` (epoch ms) -> ``ts``.

Market status: ``ACTIVE`` and ``POSTONLY`` markets have a live order book, so they give
ticks. A ``DISABLED`` market's prices are stale, so publishing them would mislead:
:func:`parse_tickers` skips it and :func:`parse_ticker` raises ExchangeError with code
``DISABLED``. A body without ``status`` is read as active (the field is informational).
"""

from __future__ import annotations

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
    "RATE_BURST",
    "parse_ticker",
    "parse_tickers",
    "ticker_url",
    "tickers_url",
]

EXCHANGE: Final = "luno"
# Documented public limit: 1 call per second per IP, bursts of 5.
MIN_INTERVAL_S: Final = 1.0
RATE_BURST: Final = 5
DISABLED: Final = "DISABLED"


class _Ticker(BaseModel):
    model_config = ConfigDict(extra="allow")

    pair: StrictStr
    timestamp: Annotated[StrictInt, Field(gt=0)]
    # Left as ``object`` so normalise_decimal is the one place that judges decimals.
    bid: object
    ask: object
    last_trade: object
    rolling_24_hour_volume: object
    status: StrictStr | None = None


class _Tickers(BaseModel):
    model_config = ConfigDict(extra="allow")

    tickers: list[_Ticker]


def ticker_url(base_url: str, pair: str) -> str:
    """``https://api.luno.com`` + ``XBTZAR`` -> ``.../api/1/ticker?pair=XBTZAR``."""
    return f"{base_url.rstrip('/')}/api/1/ticker?pair={quote(pair, safe='')}"


def tickers_url(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/api/1/tickers"


def parse_ticker(body: bytes | str) -> Tick:
    """One ``/api/1/ticker`` body -> Tick; error bodies and disabled markets raise ExchangeError."""
    data = _load(body)
    try:
        ticker = _Ticker.model_validate(data)
    except ValidationError as exc:
        raise shape_error(exc, exchange=EXCHANGE) from None
    if ticker.status == DISABLED:
        raise ExchangeError(EXCHANGE, f"market {ticker.pair} is disabled", code=DISABLED)
    return _to_tick(ticker, where="")


def parse_tickers(body: bytes | str) -> list[Tick]:
    """The ``/api/1/tickers`` body -> one Tick per market that is not disabled."""
    data = _load(body)
    try:
        tickers = _Tickers.model_validate(data).tickers
    except ValidationError as exc:
        raise shape_error(exc, exchange=EXCHANGE) from None
    return [
        _to_tick(ticker, where=f"tickers.{index}.")
        for index, ticker in enumerate(tickers)
        if ticker.status != DISABLED
    ]


def _load(body: bytes | str) -> Any:
    data = load_json(body, exchange=EXCHANGE)
    if not isinstance(data, dict):
        raise AdapterError(EXCHANGE, f"expected a JSON object, got {type(data).__name__}")
    # Luno's documented error shape: {"error": "...", "error_code": "ErrInvalidPair"}.
    if "error" in data or "error_code" in data:
        code = data.get("error_code")
        raise ExchangeError(
            EXCHANGE,
            str(data.get("error") or "error body without a message"),
            code=code if isinstance(code, str) else None,
        )
    return data


def _to_tick(ticker: _Ticker, *, where: str) -> Tick:
    def decimal(field: str, value: object) -> str:
        return normalise_decimal(value, exchange=EXCHANGE, field=f"{where}{field}")

    return Tick(
        exchange=EXCHANGE,
        pair=canonical_pair(ticker.pair, exchange=EXCHANGE),
        bid=decimal("bid", ticker.bid),
        ask=decimal("ask", ticker.ask),
        last=decimal("last_trade", ticker.last_trade),
        volume_24h=decimal("rolling_24_hour_volume", ticker.rolling_24_hour_volume),
        ts=utc_from_millis(ticker.timestamp, exchange=EXCHANGE, field=f"{where}timestamp"),
    )
