"""SimulatorFeed: deterministic with a seed, always valid ticks, paced by the injected sleep."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from bridge.core.tick import Tick
from bridge.errors import FeedError
from feeds.simulator import DEFAULT_MARKETS, SimulatorFeed

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


class FakeTime:
    """A clock that only moves when the feed sleeps, recording every sleep."""

    def __init__(self) -> None:
        self.now = START
        self.sleeps: list[float] = []

    def clock(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += timedelta(seconds=seconds)


def make_feed(
    time: FakeTime,
    *,
    markets: list[tuple[str, str]] | None = None,
    interval_s: float = 1.0,
    seed: int = 7,
    max_ticks: int | None = None,
) -> SimulatorFeed:
    return SimulatorFeed(
        markets=markets,
        interval_s=interval_s,
        seed=seed,
        clock=time.clock,
        sleep=time.sleep,
        max_ticks=max_ticks,
    )


async def collect(feed: SimulatorFeed) -> list[Tick]:
    return [tick async for tick in feed.ticks()]


async def test_same_seed_same_ticks() -> None:
    first = await collect(make_feed(FakeTime(), max_ticks=60))
    second = await collect(make_feed(FakeTime(), max_ticks=60))
    assert [t.encode() for t in first] == [t.encode() for t in second]


async def test_different_seed_different_ticks() -> None:
    first = await collect(make_feed(FakeTime(), max_ticks=20, seed=1))
    second = await collect(make_feed(FakeTime(), max_ticks=20, seed=2))
    assert [t.last for t in first] != [t.last for t in second]


async def test_ticks_are_valid_positive_and_ordered() -> None:
    ticks = await collect(make_feed(FakeTime(), max_ticks=len(DEFAULT_MARKETS) * 50))
    assert len(ticks) == len(DEFAULT_MARKETS) * 50
    for tick in ticks:
        # Through the wire and back: the strings are canonical decimals.
        assert Tick.decode(tick.encode()) == tick
        bid, ask, last = Decimal(tick.bid), Decimal(tick.ask), Decimal(tick.last)
        assert bid > 0
        assert bid < ask
        assert bid <= last <= ask
        assert Decimal(tick.volume_24h) > 0
        assert tick.seq == 0
        for text in (tick.bid, tick.ask, tick.last, tick.volume_24h):
            assert "e" not in text.lower()
            assert not (("." in text) and text.endswith("0"))


async def test_prices_quantised_to_minor_units() -> None:
    ticks = await collect(make_feed(FakeTime(), max_ticks=len(DEFAULT_MARKETS) * 5))
    for tick in ticks:
        for text in (tick.bid, tick.ask, tick.last):
            _, _, fraction = text.partition(".")
            assert len(fraction) <= 2, (tick.topic, text)


async def test_covers_zar_ngn_and_kes_on_three_exchanges() -> None:
    ticks = await collect(make_feed(FakeTime(), max_ticks=len(DEFAULT_MARKETS)))
    assert {t.pair.split("-")[1] for t in ticks} == {"ZAR", "NGN", "KES"}
    assert {t.exchange for t in ticks} == {"luno", "valr", "quidax"}
    assert [(t.exchange, t.pair) for t in ticks] == list(DEFAULT_MARKETS)


async def test_prices_in_plausible_range() -> None:
    ticks = await collect(make_feed(FakeTime(), max_ticks=len(DEFAULT_MARKETS)))
    by_market = {(t.exchange, t.pair): Decimal(t.last) for t in ticks}
    assert 1_000_000 < by_market["luno", "BTC-ZAR"] < 3_000_000
    assert 10 < by_market["valr", "USDT-ZAR"] < 25
    assert 1_000 < by_market["quidax", "USDT-NGN"] < 2_500
    # The same asset on two venues stays within a few percent.
    luno, valr = by_market["luno", "BTC-ZAR"], by_market["valr", "BTC-ZAR"]
    assert abs(luno - valr) / luno < Decimal("0.03")


async def test_prices_move_and_volume_drifts() -> None:
    ticks = await collect(make_feed(FakeTime(), markets=[("valr", "BTC-ZAR")], max_ticks=30))
    assert len({t.last for t in ticks}) > 1
    assert len({t.volume_24h for t in ticks}) > 1


async def test_market_subset_in_given_order() -> None:
    markets = [("quidax", "USDT-KES"), ("luno", "BTC-ZAR")]
    feed = make_feed(FakeTime(), markets=markets, max_ticks=6)
    assert feed.markets == tuple(markets)
    ticks = await collect(feed)
    assert [(t.exchange, t.pair) for t in ticks] == markets * 3


@pytest.mark.parametrize("max_ticks", [0, 1, 5, 14, 15])
async def test_max_ticks_stops_exactly(max_ticks: int) -> None:
    ticks = await collect(make_feed(FakeTime(), max_ticks=max_ticks))
    assert len(ticks) == max_ticks


async def test_sleeps_interval_between_rounds_only() -> None:
    time = FakeTime()
    markets = [("luno", "BTC-ZAR"), ("valr", "ETH-ZAR")]
    ticks = await collect(make_feed(time, markets=markets, interval_s=2.5, max_ticks=6))
    # Three rounds of two: a sleep between rounds, none before the first or after the last.
    assert time.sleeps == [2.5, 2.5]
    rounds = [START + timedelta(seconds=2.5 * i) for i in range(3)]
    assert [t.ts for t in ticks] == [ts for ts in rounds for _ in markets]


async def test_runs_until_closed_without_max_ticks() -> None:
    time = FakeTime()
    feed = make_feed(time, markets=[("luno", "BTC-ZAR")], interval_s=1.0)
    ticks = feed.ticks()
    assert isinstance(ticks, AsyncGenerator)
    received = [await anext(ticks) for _ in range(100)]
    await ticks.aclose()
    assert len(received) == 100
    assert len(time.sleeps) == 99


async def test_name() -> None:
    assert make_feed(FakeTime()).name == "simulator"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"interval_s": -1.0}, "interval_s"),
        ({"interval_s": float("nan")}, "interval_s"),
        ({"max_ticks": -1}, "max_ticks"),
        ({"markets": []}, "no markets"),
        ({"markets": [("luno", "BTC-ZAR"), ("luno", "BTC-ZAR")]}, "duplicate"),
        ({"markets": [("binance", "BTC-ZAR")]}, "binance"),
        ({"markets": [("luno", "DOGE-ZAR")]}, "DOGE-ZAR"),
        ({"markets": [("luno", "BTC-EUR")]}, "BTC-EUR"),
        ({"markets": [("luno", "XBTZAR")]}, "XBTZAR"),
    ],
)
def test_bad_options_raise_feed_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(FeedError, match=message):
        SimulatorFeed(**options)


def test_default_markets_are_unique() -> None:
    assert len(set(DEFAULT_MARKETS)) == len(DEFAULT_MARKETS)
