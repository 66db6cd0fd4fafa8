"""A synthetic feed for demos and tests: correlated random walks for ZAR, NGN and KES markets.

Model, per round of ``interval_s`` seconds:

- each base asset has a USD price following geometric Brownian motion with its own
  annualised volatility (BTC, ETH, SOL, stablecoins);
- each quote currency has a units-per-USD rate following GBM too (NGN swings more than KES);
- a market's mid is ``base_usd * quote_per_usd * exp(premium)``, where the premium is a
  small mean-reverting (Ornstein-Uhlenbeck) offset per market, so BTC-ZAR on luno and on
  valr move together but never quote exactly the same;
- bid/ask straddle the mid by a per-exchange spread, last lies between them, and the
  24h volume wanders around a typical level.

Prices are computed in floats, then quantised with :class:`~decimal.Decimal` to the quote
currency's minor unit, so the wire strings are exact and canonical.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Final

from bridge.core.tick import Tick
from bridge.errors import FeedError
from feeds.base import Clock, Sleep, utc_now
from feeds.pairs import split_pair

__all__ = ["DEFAULT_MARKETS", "SimulatorFeed"]

DEFAULT_MARKETS: Final[tuple[tuple[str, str], ...]] = (
    ("luno", "BTC-ZAR"),
    ("luno", "ETH-ZAR"),
    ("luno", "USDC-ZAR"),
    ("luno", "BTC-NGN"),
    ("luno", "USDT-NGN"),
    ("luno", "BTC-KES"),
    ("valr", "BTC-ZAR"),
    ("valr", "ETH-ZAR"),
    ("valr", "USDT-ZAR"),
    ("valr", "SOL-ZAR"),
    ("quidax", "BTC-NGN"),
    ("quidax", "ETH-NGN"),
    ("quidax", "USDT-NGN"),
    ("quidax", "USDT-KES"),
)

_SECONDS_PER_YEAR: Final = 365.25 * 24 * 3600
_SECONDS_PER_DAY: Final = 24 * 3600


@dataclass(frozen=True)
class _Base:
    usd: float  # starting price in USD
    vol: float  # annualised volatility
    volume: float  # typical 24h volume on one market, in base units
    volume_decimals: int


@dataclass(frozen=True)
class _Quote:
    per_usd: float  # starting units per USD
    vol: float  # annualised volatility against USD
    decimals: int  # minor unit the exchanges quote in


@dataclass(frozen=True)
class _Exchange:
    spread_bps: float  # typical full spread
    volume_scale: float  # relative liquidity


# Rough early-2026 levels; only their order of magnitude matters for a demo.
_BASES: Final = {
    "BTC": _Base(usd=95_000.0, vol=0.55, volume=30.0, volume_decimals=8),
    "ETH": _Base(usd=3_300.0, vol=0.70, volume=400.0, volume_decimals=8),
    "SOL": _Base(usd=160.0, vol=0.90, volume=5_000.0, volume_decimals=6),
    "USDT": _Base(usd=1.0, vol=0.01, volume=1_500_000.0, volume_decimals=2),
    "USDC": _Base(usd=1.0, vol=0.01, volume=250_000.0, volume_decimals=2),
}
_QUOTES: Final = {
    "ZAR": _Quote(per_usd=17.6, vol=0.15, decimals=2),
    "NGN": _Quote(per_usd=1_480.0, vol=0.30, decimals=2),
    "KES": _Quote(per_usd=129.5, vol=0.06, decimals=2),
}
_EXCHANGES: Final = {
    "luno": _Exchange(spread_bps=12.0, volume_scale=1.0),
    "valr": _Exchange(spread_bps=6.0, volume_scale=1.4),
    "quidax": _Exchange(spread_bps=25.0, volume_scale=0.4),
}

# Premium: OU with a ~10 minute mean-reversion time and ~15 bps stationary spread between venues.
_PREMIUM_THETA: Final = 1 / 600
_PREMIUM_STD: Final = 0.0015
# Volume: log-OU pulled back to its typical level within about a day.
_VOLUME_THETA: Final = 1.0
_VOLUME_VOL: Final = 0.6


def _wire_decimal(value: Decimal) -> str:
    """Canonical tick decimal: fixed point, no exponent, no trailing zeros."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


@dataclass
class _Market:
    exchange: str
    pair: str
    base: str
    quote: str
    step: Decimal
    volume_step: Decimal
    spread_bps: float
    premium_mean: float
    premium: float
    volume_target: float
    log_volume: float


class SimulatorFeed:
    """Feed producing one tick per market per round from a seeded random walk.

    The walk's state lives on the instance: iterating :meth:`ticks` again continues where
    the previous iteration stopped, like a restarted exchange connection would.
    """

    def __init__(
        self,
        *,
        markets: Iterable[tuple[str, str]] | None = None,
        interval_s: float = 1.0,
        seed: int | None = None,
        clock: Clock = utc_now,
        sleep: Sleep = asyncio.sleep,
        max_ticks: int | None = None,
    ) -> None:
        if not (math.isfinite(interval_s) and interval_s >= 0):
            raise FeedError("simulator", f"interval_s must be a finite number >= 0, got {interval_s!r}")
        if max_ticks is not None and max_ticks < 0:
            raise FeedError("simulator", f"max_ticks must be >= 0, got {max_ticks!r}")
        chosen = list(DEFAULT_MARKETS if markets is None else markets)
        if not chosen:
            raise FeedError("simulator", "no markets to simulate")
        if len(set(chosen)) != len(chosen):
            raise FeedError("simulator", "duplicate markets")
        self._interval_s = interval_s
        self._clock = clock
        self._sleep = sleep
        self._max_ticks = max_ticks
        self._rng = random.Random(seed)
        self._markets = [self._new_market(exchange, pair) for exchange, pair in chosen]
        self._base_usd = {m.base: _BASES[m.base].usd for m in self._markets}
        self._quote_rate = {m.quote: _QUOTES[m.quote].per_usd for m in self._markets}

    @property
    def name(self) -> str:
        return "simulator"

    @property
    def markets(self) -> tuple[tuple[str, str], ...]:
        return tuple((m.exchange, m.pair) for m in self._markets)

    def _new_market(self, exchange: str, pair: str) -> _Market:
        venue = _EXCHANGES.get(exchange)
        if venue is None:
            raise FeedError(exchange, f"simulator has no exchange {exchange!r}; known: {sorted(_EXCHANGES)}")
        base_name, quote_name = split_pair(pair, exchange=exchange)
        if f"{base_name}-{quote_name}" != pair:
            raise FeedError(exchange, f"pair {pair!r} is not canonical BASE-QUOTE")
        base, quote = _BASES.get(base_name), _QUOTES.get(quote_name)
        if base is None or quote is None:
            raise FeedError(exchange, f"simulator cannot price {pair!r}")
        # Venues differ a little in level and liquidity; drawn from the seed for determinism.
        premium_mean = self._rng.gauss(0.0, _PREMIUM_STD)
        volume_target = base.volume * venue.volume_scale * self._rng.uniform(0.5, 1.5)
        return _Market(
            exchange=exchange,
            pair=pair,
            base=base_name,
            quote=quote_name,
            step=Decimal(1).scaleb(-quote.decimals),
            volume_step=Decimal(1).scaleb(-base.volume_decimals),
            spread_bps=venue.spread_bps,
            premium_mean=premium_mean,
            premium=premium_mean,
            volume_target=volume_target,
            log_volume=math.log(volume_target),
        )

    def _advance(self) -> None:
        # A zero interval means "as fast as possible", not "frozen prices": walk as if 1 s passed.
        dt = self._interval_s or 1.0
        years = dt / _SECONDS_PER_YEAR
        for name in sorted(self._base_usd):
            self._base_usd[name] *= self._gbm_factor(_BASES[name].vol, years)
        for name in sorted(self._quote_rate):
            self._quote_rate[name] *= self._gbm_factor(_QUOTES[name].vol, years)
        premium_sigma = _PREMIUM_STD * math.sqrt(2 * _PREMIUM_THETA)
        days = dt / _SECONDS_PER_DAY
        for m in self._markets:
            m.premium += _PREMIUM_THETA * (m.premium_mean - m.premium) * dt
            m.premium += premium_sigma * math.sqrt(dt) * self._rng.gauss(0.0, 1.0)
            m.log_volume += _VOLUME_THETA * (math.log(m.volume_target) - m.log_volume) * days
            m.log_volume += _VOLUME_VOL * math.sqrt(days) * self._rng.gauss(0.0, 1.0)

    def _gbm_factor(self, vol: float, years: float) -> float:
        # Zero drift in price terms: the -vol^2/2 correction keeps the expected price flat.
        return math.exp(-0.5 * vol * vol * years + vol * math.sqrt(years) * self._rng.gauss(0.0, 1.0))

    def _tick(self, m: _Market) -> Tick:
        mid = self._base_usd[m.base] * self._quote_rate[m.quote] * math.exp(m.premium)
        half_spread = mid * m.spread_bps * self._rng.uniform(0.6, 1.6) / 20_000
        # Round outwards so quantising never crosses the book, and keep both sides positive.
        bid = max(Decimal(mid - half_spread).quantize(m.step, ROUND_FLOOR), m.step)
        ask = max(Decimal(mid + half_spread).quantize(m.step, ROUND_CEILING), bid + m.step)
        last = (bid + (ask - bid) * Decimal(self._rng.random())).quantize(m.step, ROUND_HALF_EVEN)
        last = min(max(last, bid), ask)
        volume = Decimal(math.exp(m.log_volume)).quantize(m.volume_step, ROUND_HALF_EVEN)
        return Tick(
            exchange=m.exchange,
            pair=m.pair,
            bid=_wire_decimal(bid),
            ask=_wire_decimal(ask),
            last=_wire_decimal(last),
            volume_24h=_wire_decimal(volume),
            ts=self._clock(),
        )

    async def ticks(self) -> AsyncIterator[Tick]:
        emitted = 0
        first_round = True
        while True:
            if self._max_ticks is not None and emitted >= self._max_ticks:
                return
            if not first_round:
                await self._sleep(self._interval_s)
            first_round = False
            self._advance()
            for market in self._markets:
                if self._max_ticks is not None and emitted >= self._max_ticks:
                    return
                yield self._tick(market)
                emitted += 1
