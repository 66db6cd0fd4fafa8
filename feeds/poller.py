"""A :class:`~feeds.base.Feed` that polls an exchange's public REST ticker endpoints.

Each round fetches every configured pair (or the one all-markets endpoint), yields the
ticks, then waits for the next round. Requests go through a token bucket
(:class:`RateLimiter`) so we never exceed the exchange's published limit. Remote failures
(connect errors, timeouts, HTTP 429/5xx, error bodies, malformed bodies) are logged and
retried with exponential back-off and jitter; they never end the iterator, because a feed
that dies on one bad answer would leave its topics silent until someone restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from types import ModuleType
from typing import Final

import httpx

from bridge.core.tick import Tick
from bridge.errors import AdapterError, ExchangeError, FeedError
from feeds import luno, quidax, valr
from feeds.base import Clock, Sleep, utc_now

__all__ = [
    "FEED_KINDS",
    "LUNO",
    "POLLED_EXCHANGES",
    "QUIDAX",
    "SPECS",
    "VALR",
    "ExchangeSpec",
    "HttpPoller",
    "PollerStats",
    "RateLimiter",
    "backoff_delay",
    "failure_reason",
    "retry_after_seconds",
]

logger = logging.getLogger(__name__)

USER_AGENT: Final = "market-bridge/0.1"
# Past 62 doublings the delay is capped anyway; stopping there keeps 2**n a sane float.
_MAX_DOUBLINGS: Final = 62


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    """What the poller needs to know about one exchange's REST API."""

    name: str
    ticker_url: Callable[[str, str], str]
    tickers_url: Callable[[str], str]
    parse_ticker: Callable[[bytes | str], Tick]
    parse_tickers: Callable[[bytes | str], list[Tick]]
    min_interval_s: float  # sustained spacing between requests
    burst: int  # requests allowed back to back after a quiet spell


def _spec(module: ModuleType) -> ExchangeSpec:
    """Every adapter module exposes the same names; read them once here."""
    return ExchangeSpec(
        name=module.EXCHANGE,
        ticker_url=module.ticker_url,
        tickers_url=module.tickers_url,
        parse_ticker=module.parse_ticker,
        parse_tickers=module.parse_tickers,
        min_interval_s=module.MIN_INTERVAL_S,
        burst=module.RATE_BURST,
    )


LUNO: Final = _spec(luno)
VALR: Final = _spec(valr)
QUIDAX: Final = _spec(quidax)
# The one list of exchanges polled over REST: the config's feed kinds and the CLI read it.
SPECS: Final[Mapping[str, ExchangeSpec]] = {spec.name: spec for spec in (LUNO, VALR, QUIDAX)}
POLLED_EXCHANGES: Final = tuple(SPECS)
FEED_KINDS: Final = ("simulator", "replay", *POLLED_EXCHANGES)


class RateLimiter:
    """Token bucket: ``burst`` requests at once, then one per ``interval_s``.

    Pure bookkeeping: :meth:`reserve` takes a token and says how long to wait before using
    it, so the caller owns the sleeping and tests drive time through ``clock``. Tokens may go
    negative: a caller that reserves early queues behind the ones already waiting.
    """

    def __init__(
        self, interval_s: float, burst: int = 1, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self._interval_s = interval_s
        self._burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def reserve(self) -> float:
        """Take one token; return the seconds to wait before sending (0 if none)."""
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self._burst), self._tokens + elapsed / self._interval_s)
        self._updated = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens * self._interval_s


def backoff_delay(failures: int, *, base_s: float, cap_s: float, jitter: float) -> float:
    """Delay after ``failures`` consecutive failures: ``base * 2**(failures-1)`` capped, jittered.

    "Equal jitter": half the delay is fixed, half is random (``jitter`` in [0, 1)), so
    pollers restarted together spread out but every retry still waits a real while.
    """
    if failures < 1:
        return 0.0
    ceiling = min(cap_s, base_s * 2.0 ** min(failures - 1, _MAX_DOUBLINGS))
    return ceiling / 2 + ceiling / 2 * jitter


def retry_after_seconds(value: str | None, *, now: datetime) -> float | None:
    """A ``Retry-After`` header (delta-seconds or HTTP-date) -> seconds; None if absent/bad."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


def failure_reason(exc: Exception) -> str:
    """A short stable code per kind of remote failure, used as the counter key."""
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    if isinstance(exc, httpx.HTTPError):
        return "transport"
    if isinstance(exc, ExchangeError) and exc.status == 429:
        return "http_429"
    if isinstance(exc, ExchangeError) and exc.status is not None and exc.status >= 500:
        return "http_5xx"
    if isinstance(exc, ExchangeError):
        return "exchange"
    return "adapter"


@dataclass(frozen=True, slots=True)
class PollerStats:
    """A snapshot of the poller's counters (for metrics)."""

    requests: int
    ticks: int
    errors: Mapping[str, int]
    consecutive_failures: int


class _RateLimited(ExchangeError):
    """HTTP 429, carrying the server's Retry-After (seconds) if it sent one."""

    def __init__(self, exchange: str, retry_after_s: float | None) -> None:
        super().__init__(exchange, "HTTP 429 Too Many Requests", status=429)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class _Target:
    url: str
    parse: Callable[[bytes], list[Tick]]


class HttpPoller:
    """Polls ``pairs`` (exchange symbols, e.g. ``XBTZAR``) or, with ``pairs=None``, the
    all-markets endpoint, every ``interval_s`` (time between the starts of two rounds).

    ``client`` is borrowed if given (the caller closes it); otherwise the poller opens its
    own for the life of :meth:`ticks`. ``limiter`` may be shared by pollers that hit the same
    exchange from one IP, since the exchange's limit is per IP, not per poller.
    """

    def __init__(
        self,
        *,
        spec: ExchangeSpec,
        base_url: str,
        pairs: Sequence[str] | None = None,
        interval_s: float | None = None,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = 10.0,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        now: Clock = utc_now,
        jitter: Callable[[], float] = random.random,
        limiter: RateLimiter | None = None,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        max_retry_after_s: float = 600.0,
    ) -> None:
        interval = spec.min_interval_s if interval_s is None else interval_s
        if interval < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval}")
        if pairs is not None and not pairs:
            raise ValueError("pairs must be None (all markets) or name at least one pair")
        if not 0 < backoff_base_s <= backoff_cap_s:
            raise ValueError("need 0 < backoff_base_s <= backoff_cap_s")
        self._spec = spec
        self._interval_s = interval
        self._client = client
        self._timeout_s = timeout_s
        self._sleep = sleep
        self._clock = clock
        self._now = now
        self._jitter = jitter
        self._limiter = limiter or RateLimiter(spec.min_interval_s, spec.burst, clock=clock)
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._max_retry_after_s = max_retry_after_s
        self._targets = self._build_targets(base_url, pairs)
        self._requests = 0
        self._ticks = 0
        self._errors: Counter[str] = Counter()
        self._failures = 0

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def stats(self) -> PollerStats:
        return PollerStats(
            requests=self._requests,
            ticks=self._ticks,
            errors=dict(self._errors),
            consecutive_failures=self._failures,
        )

    async def ticks(self) -> AsyncGenerator[Tick, None]:
        """Ticks forever; close the generator (``aclose``) to stop and release the client."""
        async with self._client_scope() as client:
            while True:
                round_started = self._clock()
                for target in self._targets:
                    try:
                        batch = await self._fetch(client, target)
                    except (httpx.HTTPError, FeedError) as exc:
                        await self._back_off(target, exc)
                        continue
                    if self._failures:
                        logger.info("%s: recovered after %d failure(s)", self.name, self._failures)
                    self._failures = 0
                    self._ticks += len(batch)
                    for tick in batch:
                        yield tick
                pause = round_started + self._interval_s - self._clock()
                # Always yield to the loop, even with no pause left, so one poller cannot starve others.
                await self._sleep(max(0.0, pause))

    def _build_targets(self, base_url: str, pairs: Sequence[str] | None) -> list[_Target]:
        spec = self._spec
        if pairs is None:
            return [_Target(spec.tickers_url(base_url), spec.parse_tickers)]
        return [
            _Target(spec.ticker_url(base_url, pair), lambda body: [spec.parse_ticker(body)]) for pair in pairs
        ]

    @asynccontextmanager
    async def _client_scope(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._client is not None:
            yield self._client
            return
        async with httpx.AsyncClient(timeout=self._timeout_s, headers={"User-Agent": USER_AGENT}) as client:
            yield client

    async def _fetch(self, client: httpx.AsyncClient, target: _Target) -> list[Tick]:
        wait = self._limiter.reserve()
        if wait > 0:
            await self._sleep(wait)
        self._requests += 1
        response = await client.get(target.url)
        status = response.status_code
        if status == 429:
            raise _RateLimited(
                self.name, retry_after_seconds(response.headers.get("Retry-After"), now=self._now())
            )
        if status >= 500:
            raise ExchangeError(self.name, f"HTTP {status}", status=status)
        if not 200 <= status < 300:
            # A 4xx usually carries the exchange's error body; its code beats a bare status.
            try:
                target.parse(response.content)
            except ExchangeError as exc:
                raise ExchangeError(self.name, exc.message, status=status, code=exc.code) from None
            except AdapterError:
                pass
            raise ExchangeError(self.name, f"HTTP {status}", status=status)
        return target.parse(response.content)

    async def _back_off(self, target: _Target, exc: Exception) -> None:
        reason = failure_reason(exc)
        self._errors[reason] += 1
        self._failures += 1
        delay = backoff_delay(
            self._failures, base_s=self._backoff_base_s, cap_s=self._backoff_cap_s, jitter=self._jitter()
        )
        if isinstance(exc, _RateLimited) and exc.retry_after_s is not None:
            delay = max(delay, min(exc.retry_after_s, self._max_retry_after_s))
        logger.warning(
            "%s: GET %s failed (%s): %s; retrying in %.1f s", self.name, target.url, reason, exc, delay
        )
        await self._sleep(delay)
