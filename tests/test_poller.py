"""HttpPoller against a real HTTP server on 127.0.0.1 serving recorded bodies.

Time is fake: the poller's ``sleep`` records the delay and advances ``clock``, so back-off
and rate limiting are asserted exactly without waiting.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from bridge.core.tick import Tick
from bridge.errors import AdapterError, ExchangeError
from feeds.base import Feed
from feeds.poller import (
    LUNO,
    QUIDAX,
    SPECS,
    VALR,
    ExchangeSpec,
    HttpPoller,
    RateLimiter,
    backoff_delay,
    failure_reason,
    retry_after_seconds,
)

DATA = Path(__file__).parent / "data" / "exchanges"
NOW = datetime(2026, 11, 30, 11, 0, tzinfo=UTC)
LUNO_XBTZAR = "/api/1/ticker?pair=XBTZAR"


def recorded(exchange: str, name: str) -> bytes:
    return (DATA / exchange / name).read_bytes()


class StopPolling(Exception):
    """Raised by the fake sleep to end a test whose poller would otherwise retry forever."""


class FakeTime:
    """``clock`` and ``sleep`` for the poller: sleeping records the delay and moves the clock."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.stop_after = stop_after

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        # A runaway poller fails fast here instead of spinning until the global timeout.
        if self.stop_after is not None and len(self.sleeps) >= self.stop_after:
            raise StopPolling
        assert len(self.sleeps) < 1000, "poller is spinning"


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stall: bool = False  # hold the answer until the test ends (to provoke a client timeout)


class FakeExchange:
    """Scripted replies per request path; the last reply of a script repeats forever."""

    def __init__(self, time: FakeTime) -> None:
        self.time = time
        self.scripts: dict[str, list[Reply]] = {}
        self.hits: list[tuple[str, float]] = []  # (path, fake time of the request)
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.base_url = ""

    def script(self, path: str, *replies: Reply) -> None:
        self.scripts[path] = list(replies)

    def next_reply(self, path: str) -> Reply:
        with self.lock:
            self.hits.append((path, self.time.now))
            script = self.scripts.get(path)
            if not script:
                return Reply(404, b"no script for this path")
            return script.pop(0) if len(script) > 1 else script[0]

    def paths(self) -> list[str]:
        return [path for path, _ in self.hits]

    def times(self) -> list[float]:
        return [moment for _, moment in self.hits]


def _handler(exchange: FakeExchange) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            reply = exchange.next_reply(self.path)
            if reply.stall:
                exchange.release.wait(timeout=10)
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(reply.body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean

    return Handler


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def exchange(fake_time: FakeTime) -> Iterator[FakeExchange]:
    fake = FakeExchange(fake_time)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    fake.base_url = f"http://{host!s}:{port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # trust_env=False: a proxy set in the environment must not intercept 127.0.0.1.
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as http:
        yield http


def make_poller(
    exchange: FakeExchange,
    client: httpx.AsyncClient | None,
    fake_time: FakeTime,
    *,
    spec: ExchangeSpec = LUNO,
    pairs: list[str] | None = None,
    interval_s: float = 0.25,
    base_url: str | None = None,
) -> HttpPoller:
    return HttpPoller(
        spec=spec,
        base_url=base_url or exchange.base_url,
        pairs=pairs,
        interval_s=interval_s,
        client=client,
        sleep=fake_time.sleep,
        clock=fake_time.clock,
        now=lambda: NOW,
        jitter=lambda: 1.0,  # the top of the jitter range: delays are exactly base * 2**n
    )


async def take(poller: HttpPoller, count: int) -> list[Tick]:
    got: list[Tick] = []
    async with aclosing(poller.ticks()) as stream:
        async for tick in stream:
            got.append(tick)
            if len(got) == count:
                break
    return got


def ok(exchange: str, name: str) -> Reply:
    return Reply(200, recorded(exchange, name))


# --- the poller against the local server ------------------------------------------------


async def test_yields_ticks_for_each_pair(
    exchange: FakeExchange, client: httpx.AsyncClient, fake_time: FakeTime
) -> None:
    exchange.script(LUNO_XBTZAR, ok("luno", "ticker_postonly.json"))
    exchange.script("/api/1/ticker?pair=XBTNGN", ok("luno", "ticker_ok.json"))
    poller = make_poller(exchange, client, fake_time, pairs=["XBTZAR", "XBTNGN"])

    ticks = await take(poller, 4)

    assert [(t.pair, t.bid) for t in ticks] == [("BTC-ZAR", "0.5"), ("BTC-NGN", "12579999")] * 2
    assert exchange.paths() == [LUNO_XBTZAR, "/api/1/ticker?pair=XBTNGN"] * 2
    assert poller.stats.requests == 4
    assert poller.stats.ticks == 4
    assert poller.stats.errors == {}
    assert not client.is_closed  # a borrowed client is the caller's to close


async def test_survives_errors_backs_off_and_recovers(
    exchange: FakeExchange, client: httpx.AsyncClient, fake_time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    exchange.script(
        LUNO_XBTZAR,
        Reply(500, b"oops"),
        Reply(429, b"", {"Retry-After": "7"}),
        Reply(400, recorded("luno", "error_invalid_pair.json")),
        ok("luno", "not_json.html"),
        ok("luno", "ticker_float_bid.json"),
        ok("luno", "ticker_postonly.json"),
    )
    poller = make_poller(exchange, client, fake_time, pairs=["XBTZAR"])

    with caplog.at_level(logging.WARNING, logger="feeds.poller"):
        ticks = await take(poller, 1)

    assert [t.pair for t in ticks] == ["BTC-ZAR"]
    # Back-offs 1, 2 (raised to the server's Retry-After of 7), 4, 8, 16: doubling from 1 s.
    # Each is followed by the end of a one-pair round, whose pause is already used up.
    assert fake_time.sleeps == [1.0, 0.0, 7.0, 0.0, 4.0, 0.0, 8.0, 0.0, 16.0, 0.0]
    stats = poller.stats
    assert stats.requests == 6
    assert stats.errors == {"http_5xx": 1, "http_429": 1, "exchange": 1, "adapter": 2}
    assert stats.consecutive_failures == 0
    reasons = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(reasons) == 5
    assert "(http_429)" in reasons[1]
    assert "Invalid currency pair." in reasons[2]
    assert "retrying in 16.0 s" in reasons[4]


async def test_backoff_resets_after_a_success(
    exchange: FakeExchange, client: httpx.AsyncClient, fake_time: FakeTime
) -> None:
    good = ok("luno", "ticker_ok.json")
    exchange.script(LUNO_XBTZAR, Reply(503), good, Reply(503), good)
    poller = make_poller(exchange, client, fake_time, pairs=["XBTZAR"], interval_s=0.25)

    ticks = await take(poller, 2)

    assert len(ticks) == 2
    # back-off 1; no round pause left; a round pause of 0.25; back-off 1 again (not 2); no pause.
    assert fake_time.sleeps == [1.0, 0.0, 0.25, 1.0, 0.0]
    assert poller.stats.errors == {"http_5xx": 2}


async def test_retry_after_is_capped(
    exchange: FakeExchange, client: httpx.AsyncClient, fake_time: FakeTime
) -> None:
    exchange.script(LUNO_XBTZAR, Reply(429, b"", {"Retry-After": "99999"}), ok("luno", "ticker_ok.json"))
    poller = make_poller(exchange, client, fake_time, pairs=["XBTZAR"])

    await take(poller, 1)

    assert fake_time.sleeps == [600.0, 0.0]  # the cap, then the (used up) round pause


async def test_error_status_keeps_the_exchange_code(
    exchange: FakeExchange, client: httpx.AsyncClient, fake_time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    exchange.script(
        "/v1/public/BTCZAR/marketsummary",
        Reply(400, recorded("valr", "error_invalid_pair.json")),
        Reply(404, b"<html>not found</html>"),
        ok("valr", "summary_ok.json"),
    )
    poller = make_poller(exchange, client, fake_time, spec=VALR, pairs=["BTCZAR"])

    with caplog.at_level(logging.WARNING, logger="feeds.poller"):
        ticks = await take(poller, 1)

    assert [(t.exchange, t.pair) for t in ticks] == [("valr", "BTC-ZAR")]
    assert poller.stats.errors == {"exchange": 2}
    messages = [record.getMessage() for record in caplog.records]
    assert "Currency pair not found" in messages[0]
    assert "HTTP 404" in messages[1]


@pytest.mark.parametrize(
    "case",
    [
        (LUNO, "/api/1/tickers", ok("luno", "tickers_ok.json"), ["BTC-ZAR", "ETH-ZAR"]),
        (VALR, "/v1/public/marketsummary", ok("valr", "summaries_ok.json"), ["BTC-ZAR", "USDT-ZAR"]),
        (QUIDAX, "/api/v1/markets/tickers", ok("quidax", "tickers_ok.json"), ["BTC-NGN", "ETH-NGN"]),
    ],
    ids=["luno", "valr", "quidax"],
)
async def test_all_markets_endpoint(
    exchange: FakeExchange,
    client: httpx.AsyncClient,
    fake_time: FakeTime,
    case: tuple[ExchangeSpec, str, Reply, list[str]],
) -> None:
    spec, path, reply, pairs = case
    exchange.script(path, reply)
    poller = make_poller(exchange, client, fake_time, spec=spec, pairs=None)

    ticks = await take(poller, 2)

    assert [(t.exchange, t.pair) for t in ticks] == [(spec.name, pair) for pair in pairs]
    assert exchange.paths() == [path]


async def test_quidax_single_market(
    exchange: FakeExchange, client: httpx.AsyncClient, fake_time: FakeTime
) -> None:
    exchange.script(
        "/api/v1/markets/tickers/usdtngn",
        ok("quidax", "error_not_found.json"),
        ok("quidax", "ticker_millis.json"),
    )
    poller = make_poller(exchange, client, fake_time, spec=QUIDAX, pairs=["usdtngn"])

    ticks = await take(poller, 1)

    assert [(t.pair, t.ask) for t in ticks] == [("USDT-NGN", "1655.5")]
    assert poller.stats.errors == {"exchange": 1}


@pytest.mark.parametrize(
    "case",
    [
        # Luno: a burst of 5, then one a second.
        (LUNO, ["XBTZAR"], [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]),
        (LUNO, ["XBTZAR", "XBTNGN", "ETHZAR"], [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]),
        # VALR: our default of one a second, no burst.
        (VALR, ["BTCZAR"], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    ],
    ids=["luno-one-pair", "luno-three-pairs", "valr"],
)
async def test_respects_the_rate_limit(
    exchange: FakeExchange,
    client: httpx.AsyncClient,
    fake_time: FakeTime,
    case: tuple[ExchangeSpec, list[str], list[float]],
) -> None:
    spec, pairs, expected_times = case
    for pair in pairs:
        if spec is LUNO:
            exchange.script(f"/api/1/ticker?pair={pair}", ok("luno", "ticker_ok.json"))
        else:
            exchange.script(f"/v1/public/{pair}/marketsummary", ok("valr", "summary_ok.json"))
    # interval 0: only the rate limiter holds the poller back.
    poller = make_poller(exchange, client, fake_time, spec=spec, pairs=pairs, interval_s=0)

    await take(poller, len(expected_times))

    assert exchange.times() == pytest.approx(expected_times)
    assert poller.stats.requests == len(expected_times)


async def test_connect_errors_back_off(client: httpx.AsyncClient) -> None:
    # A port that was free a moment ago: nothing listens there now.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    time = FakeTime(stop_after=4)
    poller = HttpPoller(
        spec=LUNO,
        base_url=f"http://127.0.0.1:{port}",
        pairs=["XBTZAR"],
        client=client,
        sleep=time.sleep,
        clock=time.clock,
        jitter=lambda: 0.0,  # the bottom of the jitter range: half the delay
    )

    with pytest.raises(StopPolling):
        await take(poller, 1)

    # Back-off 0.5 leaves 0.5 of Luno's default 1 s round; back-off 1.0 leaves nothing.
    assert time.sleeps == [0.5, 0.5, 1.0, 0.0]
    assert poller.stats.errors == {"connect": 2}


async def test_timeouts_back_off(exchange: FakeExchange, fake_time: FakeTime) -> None:
    exchange.script(LUNO_XBTZAR, Reply(stall=True))
    fake_time.stop_after = 1
    async with httpx.AsyncClient(trust_env=False, timeout=0.2) as short:
        poller = make_poller(exchange, short, fake_time, pairs=["XBTZAR"])
        with pytest.raises(StopPolling):
            await take(poller, 1)

    assert fake_time.sleeps == [1.0]
    assert poller.stats.errors == {"timeout": 1}


async def test_owns_its_client_when_none_is_given(
    exchange: FakeExchange, fake_time: FakeTime, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    exchange.script(LUNO_XBTZAR, ok("luno", "ticker_ok.json"))
    poller = make_poller(exchange, None, fake_time, pairs=["XBTZAR"])

    ticks = await take(poller, 1)

    assert [t.pair for t in ticks] == ["BTC-NGN"]


def test_is_a_feed(exchange: FakeExchange, fake_time: FakeTime) -> None:
    feed: Feed = make_poller(exchange, None, fake_time, spec=QUIDAX, pairs=["btcngn"])
    assert feed.name == "quidax"
    assert sorted(SPECS) == ["luno", "quidax", "valr"]


@pytest.mark.parametrize(
    ("kwargs", "mentions"),
    [
        ({"pairs": []}, "at least one pair"),
        ({"interval_s": -1.0}, "interval_s must be >= 0"),
        ({"backoff_base_s": 0.0}, "backoff_base_s"),
        ({"backoff_base_s": 10.0, "backoff_cap_s": 5.0}, "backoff_base_s <= backoff_cap_s"),
    ],
)
def test_constructor_refuses_bad_settings(kwargs: dict[str, object], mentions: str) -> None:
    with pytest.raises(ValueError, match=mentions):
        HttpPoller(spec=LUNO, base_url="http://127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


# --- the pure parts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval_s", "burst", "calls_at", "waits"),
    [
        (1.0, 1, [0, 0, 0], [0, 1, 2]),
        (1.0, 1, [0, 1, 2, 3], [0, 0, 0, 0]),
        (1.0, 5, [0] * 7, [0, 0, 0, 0, 0, 1, 2]),
        (1.0, 5, [0, 0, 0, 0, 0, 0.5], [0, 0, 0, 0, 0, 0.5]),
        # A long quiet spell refills to the burst, never beyond it.
        (1.0, 5, [0, 0, 0, 0, 0, 100, 100, 100, 100, 100, 100], [0] * 10 + [1]),
        (0.5, 2, [0, 0, 0, 0.25], [0, 0, 0.5, 0.75]),
        # A clock that steps back does not mint tokens.
        (1.0, 1, [5, 4], [0, 1]),
    ],
)
def test_rate_limiter(interval_s: float, burst: int, calls_at: list[float], waits: list[float]) -> None:
    now = [calls_at[0]]
    limiter = RateLimiter(interval_s, burst, clock=lambda: now[0])
    got = []
    for moment in calls_at:
        now[0] = moment
        got.append(limiter.reserve())
    assert got == pytest.approx(waits)


@pytest.mark.parametrize(("interval_s", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_rate_limiter_refuses_bad_settings(interval_s: float, burst: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        RateLimiter(interval_s, burst)


@pytest.mark.parametrize(
    ("failures", "jitter", "expected"),
    [
        (0, 1.0, 0.0),
        (1, 1.0, 1.0),
        (1, 0.0, 0.5),
        (2, 1.0, 2.0),
        (3, 0.5, 3.0),
        (6, 1.0, 32.0),
        (7, 1.0, 60.0),  # 64 capped at 60
        (7, 0.0, 30.0),
        (10_000, 1.0, 60.0),
    ],
)
def test_backoff_delay(failures: int, jitter: float, expected: float) -> None:
    assert backoff_delay(failures, base_s=1.0, cap_s=60.0, jitter=jitter) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("7", 7.0),
        (" 12 ", 12.0),
        ("0", 0.0),
        ("Mon, 30 Nov 2026 11:00:30 GMT", 30.0),
        ("Mon, 30 Nov 2026 10:59:00 GMT", 0.0),  # already past
        ("-3", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert retry_after_seconds(header, now=NOW) == expected


_REQUEST = httpx.Request("GET", "http://127.0.0.1/")


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (httpx.ConnectTimeout("slow", request=_REQUEST), "timeout"),
        (httpx.ReadTimeout("slow", request=_REQUEST), "timeout"),
        (httpx.ConnectError("refused", request=_REQUEST), "connect"),
        (httpx.RemoteProtocolError("eof", request=_REQUEST), "transport"),
        (ExchangeError("luno", "HTTP 429", status=429), "http_429"),
        (ExchangeError("luno", "HTTP 503", status=503), "http_5xx"),
        (ExchangeError("luno", "bad pair", status=400, code="ErrInvalidPair"), "exchange"),
        (ExchangeError("luno", "bad pair", code="ErrInvalidPair"), "exchange"),
        (AdapterError("luno", "bid: missing"), "adapter"),
    ],
)
def test_failure_reason(error: Exception, reason: str) -> None:
    assert failure_reason(error) == reason
