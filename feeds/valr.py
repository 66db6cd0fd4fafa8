"""VALR market-summary bodies -> :class:`~bridge.core.tick.Tick` (pure: no I/O).

Endpoints: ``GET /v1/public/BTCZAR/marketsummary`` (one market, an object) and
``GET /v1/public/marketsummary`` (all markets, a list of the same objects). Field mapping:
``bidPrice`` -> ``bid``, ``askPrice`` -> ``ask``, ``lastTradedPrice`` -> ``last``,
``baseVolume`` -> ``volume_24h``, ``created`` (ISO-8601, UTC) -> ``ts``.

Error bodies look like ``{"code": -1, "message": "..."}`` and raise ExchangeError.

The all-markets list also carries derivatives (e.g. ``BTCUSDTPERP``) that have no
``BASE-QUOTE`` name; :func:`parse_tickers` skips symbols :func:`canonical_pair` cannot
split rather than failing the whole list. Every other defect still raises AdapterError.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, StrictStr, TypeAdapter, ValidationError

from bridge.core.tick import Tick
from bridge.errors import AdapterError, ExchangeError
from feeds.pairs import canonical_pair
from feeds.parsing import load_json, normalise_decimal, shape_error

__all__ = [
    "EXCHANGE",
    "MIN_INTERVAL_S",
    "RATE_BURST",
    "parse_ticker",
    "parse_tickers",
    "ticker_url",
    "tickers_url",
]

EXCHANGE: Final = "valr"
# Our polite default (one call a second, no burst), well inside what a public client needs.
MIN_INTERVAL_S: Final = 1.0
RATE_BURST: Final = 1


class _Summary(BaseModel):
    model_config = ConfigDict(extra="allow")

    currency_pair: StrictStr = Field(alias="currencyPair")
    # Left as ``object`` so normalise_decimal is the one place that judges decimals.
    bid_price: object = Field(alias="bidPrice")
    ask_price: object = Field(alias="askPrice")
    last_traded_price: object = Field(alias="lastTradedPrice")
    base_volume: object = Field(alias="baseVolume")
    created: StrictStr


_SUMMARIES: Final = TypeAdapter(list[_Summary])


def ticker_url(base_url: str, pair: str) -> str:
    """``https://api.valr.com`` + ``BTCZAR`` -> ``.../v1/public/BTCZAR/marketsummary``."""
    return f"{base_url.rstrip('/')}/v1/public/{quote(pair, safe='')}/marketsummary"


def tickers_url(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/v1/public/marketsummary"


def parse_ticker(body: bytes | str) -> Tick:
    """One market summary -> Tick; an error body raises ExchangeError."""
    data = _load(body)
    if not isinstance(data, dict):
        raise AdapterError(EXCHANGE, f"expected a JSON object, got {type(data).__name__}")
    try:
        summary = _Summary.model_validate(data)
    except ValidationError as exc:
        raise shape_error(exc, exchange=EXCHANGE) from None
    return _to_tick(summary, canonical_pair(summary.currency_pair, exchange=EXCHANGE), where="")


def parse_tickers(body: bytes | str) -> list[Tick]:
    """The all-markets list -> one Tick per market with a canonical pair name."""
    data = _load(body)
    if not isinstance(data, list):
        raise AdapterError(EXCHANGE, f"expected a JSON list of market summaries, got {type(data).__name__}")
    try:
        summaries = _SUMMARIES.validate_python(data)
    except ValidationError as exc:
        raise shape_error(exc, exchange=EXCHANGE) from None
    ticks: list[Tick] = []
    for index, summary in enumerate(summaries):
        try:
            pair = canonical_pair(summary.currency_pair, exchange=EXCHANGE)
        except AdapterError:
            continue  # not a spot pair (see the module docstring)
        ticks.append(_to_tick(summary, pair, where=f"{index}."))
    return ticks


def _load(body: bytes | str) -> Any:
    data = load_json(body, exchange=EXCHANGE)
    # VALR's error shape: {"code": -1, "message": "..."}; a summary never has both keys.
    if isinstance(data, dict) and "code" in data and "message" in data:
        raise ExchangeError(EXCHANGE, str(data["message"]), code=str(data["code"]))
    return data


def _to_tick(summary: _Summary, pair: str, *, where: str) -> Tick:
    def decimal(field: str, value: object) -> str:
        return normalise_decimal(value, exchange=EXCHANGE, field=f"{where}{field}")

    return Tick(
        exchange=EXCHANGE,
        pair=pair,
        bid=decimal("bidPrice", summary.bid_price),
        ask=decimal("askPrice", summary.ask_price),
        last=decimal("lastTradedPrice", summary.last_traded_price),
        volume_24h=decimal("baseVolume", summary.base_volume),
        ts=_created(summary.created, field=f"{where}created"),
    )


def _created(value: str, *, field: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise AdapterError(EXCHANGE, f"{field}: not ISO-8601: {value[:40]!r}") from None
    # The docs define ``created`` as UTC, so a missing offset means UTC rather than local time.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
