"""bridge.logs: escaping, caps, the client-fault rate limit, and what a real broker writes under attack.

The pure parts run table-driven on an injected clock. The integration tests put the handler
``setup_logging`` installs (formatter and rate limit, on a fake clock) on the root logger of
a real broker, attack it over TCP and WebSocket, and read what was written.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import InvalidMessage
from websockets.sync.client import connect as ws_connect

from bridge.auth import Role
from bridge.config import LoggingConfig
from bridge.edge.ws_connection import WsListener
from bridge.logs import (
    CLIENT,
    MAX_MESSAGE_CHARS,
    QUIET_LOGGERS,
    STORE,
    HandshakeLog,
    JsonFormatter,
    OutageLog,
    PlainFormatter,
    RateLimitFilter,
    clip,
    flush,
    log_handler,
    safe_message,
)
from tests.conftest import (
    DEADLINE_S,
    BrokerThread,
    Client,
    Transport,
    _mqtt_str,
    _packet,
    authed_connect,
    unique,
    wait_until,
)

# Anything that would break or rewrite a line: what must never reach the output raw.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
LINE_START = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: "
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def record(
    msg: str = "client %s may not publish to %s",
    *args: object,
    name: str = "bridge.edge.broker",
    level: int = logging.INFO,
    client: bool = True,
    exc_info: Any = None,
) -> logging.LogRecord:
    made = logging.LogRecord(name, level, __file__, 1, msg, args or None, exc_info)
    if client:
        made.__dict__.update(CLIENT)
    return made


# --- escaping and caps ---------------------------------------------------------------------------

ELLIPSIS = "\u2026"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("plain text stays", "plain text stays"),
        ("two\nlines", "two\\nlines"),
        ("carriage\rreturn", "carriage\\rreturn"),
        ("tab\there", "tab\\there"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("nul\x00 del\x7f c1\x85 csi\x9b", "nul\\x00 del\\x7f c1\\x85 csi\\x9b"),
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),
        ("bidi \u202eevil\u202c \u2066iso\u2069", "bidi \\u202eevil\\u202c \\u2066iso\\u2069"),
        ("lone \udc80 surrogate", "lone \\udc80 surrogate"),
        ("quotes ' \" and \\ stay", "quotes ' \" and \\ stay"),
        ("non-ASCII Zoë ₦ 東京 stays", "non-ASCII Zoë ₦ 東京 stays"),
        ("y" * MAX_MESSAGE_CHARS, "y" * MAX_MESSAGE_CHARS),
        ("y" * 3000, "y" * MAX_MESSAGE_CHARS + f"{ELLIPSIS}(+952 chars)"),
        # Escapes count against the cap: 1,024 escaped newlines fill it.
        ("\n" * 3000, "\\n" * 1024 + f"{ELLIPSIS}(+1,976 chars)"),
        # An escape that would straddle the cap is left out whole.
        ("y" * 2047 + "\x1b" + "z", "y" * 2047 + f"{ELLIPSIS}(+2 chars)"),
        ("y" * 2040 + "\x1b" + "z" * 10, "y" * 2040 + "\\x1b" + "zzzz" + f"{ELLIPSIS}(+6 chars)"),
    ],
)
def test_safe_message(message: str, expected: str) -> None:
    assert safe_message(message) == expected


@given(st.text(), st.integers(min_value=1, max_value=300))
def test_safe_message_is_one_line_and_bounded(message: str, limit: int) -> None:
    shown = safe_message(message, limit)
    assert not RAW_CONTROL.search(shown)
    assert "\n" not in shown
    body = shown.split(ELLIPSIS + "(+", 1)[0]
    assert len(body) <= limit


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [
        ("alice", 80, "alice"),
        ("market/luno/BTC-ZAR", 80, "market/luno/BTC-ZAR"),
        ("user/bob/alerts:1@x+y=z~", 80, "user/bob/alerts:1@x+y=z~"),
        ("Zoë", 80, "Zoë"),
        ("", 80, "''"),
        ("two words", 80, "'two words'"),
        ("it's", 80, "'it\\'s'"),
        ("back\\slash", 80, "'back\\\\slash'"),
        ("evil\nINFO forged", 80, "'evil\\nINFO forged'"),
        ("\r\x1b[31m\u2028\u202e", 80, "'\\r\\x1b[31m\\u2028\\u202e'"),
        (None, 80, "None"),
        (ValueError("bad 'x'\n"), 80, "'bad \\'x\\'\\n'"),
        ("x" * 60_000, 80, "x" * 80 + f"{ELLIPSIS}(+59,920 chars)"),
        ("a b" * 20_000, 80, "'" + ("a b" * 27)[:80] + f"'{ELLIPSIS}(+59,920 chars)"),
        # Escapes count against the limit too: 80 ESC bytes show as 20 escapes.
        ("\x1b" * 80, 80, "'" + "\\x1b" * 20 + f"'{ELLIPSIS}(+60 chars)"),
        ("abcdef", 3, f"abc{ELLIPSIS}(+3 chars)"),
    ],
)
def test_clip(value: object, limit: int, expected: str) -> None:
    assert clip(value, limit) == expected


def test_clip_makes_a_60kb_topic_cost_about_100_chars() -> None:
    assert len(clip("user/bob/" + "x" * 60_000)) < 100


@given(st.text(), st.integers(min_value=1, max_value=200))
def test_clip_is_bounded_and_unambiguous(value: str, limit: int) -> None:
    shown = clip(value, limit)
    assert not RAW_CONTROL.search(shown)
    assert "\n" not in shown
    body = shown.split(ELLIPSIS + "(+", 1)[0]
    assert len(body) <= limit + 2  # the quotes
    # Bare only when it is one plain token; anything else is quoted, inner quotes escaped.
    assert re.fullmatch(r"[\w.:/@+#$%=~-]+", body) or re.fullmatch(r"'([^'\\]|\\.)*'", body)


def test_plain_formatter_one_record_one_line_traceback_kept() -> None:
    formatter = PlainFormatter()
    line = formatter.format(
        record("connected %s", "evil\n2026-01-01 00:00:00,000 INFO    bridge.edge.broker: x")
    )
    assert "\n" not in line
    assert line.endswith("connected evil\\n2026-01-01 00:00:00,000 INFO    bridge.edge.broker: x")
    try:
        raise RuntimeError("our own bug")
    except RuntimeError:
        with_traceback = formatter.format(record("handler failed", exc_info=sys.exc_info()))
    first, *rest = with_traceback.split("\n")
    assert first.endswith("handler failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: our own bug"


def test_plain_formatter_caps_the_message() -> None:
    line = PlainFormatter().format(record("dropped tick on %s", "x" * 100_000))
    assert len(line) < MAX_MESSAGE_CHARS + 100
    assert line.endswith(f"{ELLIPSIS}(+97,968 chars)")


@pytest.mark.parametrize(
    "message",
    ["two\nlines", "\r\x1b[31m", "\u2028\u2029", "del\x7f", "c1\x85\x9b", "quote\" back\\ ' ok"],
)
def test_json_formatter_escapes_and_round_trips(message: str) -> None:
    line = JsonFormatter().format(record("%s", message))
    assert not RAW_CONTROL.search(line)
    assert "\n" not in line
    assert json.loads(line)["msg"] == message


def test_json_formatter_caps_the_message_and_keeps_tracebacks() -> None:
    try:
        raise RuntimeError("our own bug")
    except RuntimeError:
        line = JsonFormatter().format(record("%s", "x" * 10_000, exc_info=sys.exc_info()))
    event = json.loads(line)
    assert event["msg"] == "x" * MAX_MESSAGE_CHARS + f"{ELLIPSIS}(+7,952 chars)"
    assert event["exc"].startswith("Traceback")
    assert event["exc"].endswith("RuntimeError: our own bug")


@pytest.mark.parametrize(
    ("tag", "plain_has", "json_tag"),
    [
        (None, " INFO    bridge.edge.broker: hello", None),
        ("web-w1", " INFO    [web-w1] bridge.edge.broker: hello", "web-w1"),
    ],
)
def test_formatters_name_the_tagged_process(tag: str | None, plain_has: str, json_tag: str | None) -> None:
    """``logging.tag`` (each ``--workers`` worker's node id) in every line of a shared stream."""
    assert PlainFormatter(tag).format(record("hello")).endswith(plain_has)
    assert json.loads(JsonFormatter(tag).format(record("hello"))).get("tag") == json_tag


# --- the rate limit ------------------------------------------------------------------------------


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


def limited(clock: FakeClock, **kwargs: Any) -> tuple[RateLimitFilter, Collect]:
    sink = Collect()
    kwargs.setdefault("burst", 3)
    return RateLimitFilter(clock=clock, **kwargs).attach(sink), sink


# (seconds to advance, record or "flush"/"force", expected new output lines)
Step = tuple[float, logging.LogRecord | str, list[str]]
MSG = "client %s may not publish to %s"


def publish(n: int) -> logging.LogRecord:
    return record(MSG, f"c{n}", "user/bob/x")


def passes(n: int, advance: float = 0) -> Step:
    return (advance, publish(n), [f"client c{n} may not publish to user/bob/x"])


SUMMARY_10 = "suppressed {} similar messages in 10s: 'client %s may not publish to %s'"


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param(
            [
                passes(1),
                passes(2, 1),
                passes(3, 1),
                (1, publish(4), []),
                (1, publish(5), []),
                (1, "flush", []),  # the interval has not ended
                (5, "flush", [SUMMARY_10.format(2)]),  # 10 s after the first
                (0, "flush", []),  # said once
                passes(6),  # a new interval
            ],
            id="burst-then-summary-on-flush",
        ),
        pytest.param(
            [
                *[passes(n) for n in range(3)],
                *[(0.001, publish(n), []) for n in range(2_990)],
                # The key's next record after the interval: the summary first, then it passes.
                (10, publish(7), [SUMMARY_10.format("2,990"), "client c7 may not publish to user/bob/x"]),
            ],
            id="summary-when-the-next-record-comes",
        ),
        pytest.param(
            [
                *[passes(n) for n in range(3)],
                *[(0, publish(n), []) for n in range(2)],
                (2, "force", ["suppressed 2 similar messages in 2s: 'client %s may not publish to %s'"]),
            ],
            id="forced-flush-says-the-elapsed-time",
        ),
        pytest.param(
            [*[passes(n) for n in range(3)], (30, "flush", [])],
            id="nothing-suppressed-nothing-said",
        ),
        pytest.param(
            [
                *[
                    (0, record("not a client fault %s", n, client=False), [f"not a client fault {n}"])
                    for n in range(5)
                ],
                *[
                    (
                        0,
                        record("poll %s", n, name="feeds.poller", level=logging.WARNING, client=False),
                        [f"poll {n}"],
                    )
                    for n in range(5)
                ],
                *[(0, record("lib %s", n, name="amqttx", client=False), [f"lib {n}"]) for n in range(5)],
            ],
            id="unmarked-records-always-pass",
        ),
    ],
)
def test_rate_limit(steps: list[Step]) -> None:
    clock = FakeClock()
    limiter, sink = limited(clock)
    for advance, what, expected in steps:
        clock.advance(advance)
        before = len(sink.records)
        if what == "flush":
            limiter.flush()
        elif what == "force":
            limiter.flush(force=True)
        else:
            assert isinstance(what, logging.LogRecord)
            sink.handle(what)  # through the filter attached to it
        shown = sink.messages()[before:]
        assert shown == expected


@pytest.mark.parametrize("name", ["amqtt", "amqtt.broker", "websockets.server", "websockets", "asyncio"])
def test_third_party_records_are_limited_per_logger_and_template(name: str) -> None:
    clock = FakeClock()
    limiter, sink = limited(clock)
    passed = [
        limiter.filter(record(f"[MQTT-3.1.0-1] client {n} says", name=name, client=False)) for n in range(2)
    ]
    # An f-string template: each distinct one is its own key.
    assert passed == [True, True]
    same = [limiter.filter(record("opening handshake failed", name=name, client=False)) for _ in range(5)]
    assert same == [True, True, True, False, False]
    assert limiter.filter(record("opening handshake failed", name="bridge.other", client=True))
    clock.advance(10)
    limiter.flush()
    assert sink.messages() == ["suppressed 2 similar messages in 10s: 'opening handshake failed'"]
    assert sink.records[0].name == name
    assert sink.records[0].levelno == logging.INFO


def test_store_faults_are_limited_like_client_faults() -> None:
    """A full disk fails every write the same way: extra=STORE lines are limited per template."""
    clock = FakeClock()
    limiter, sink = limited(clock, burst=2)
    fault = "could not take %s's message on %s: %s"
    for n in range(5):
        made = record(
            fault, f"svc-{n}", "user/kim/a", "database or disk is full", level=logging.ERROR, client=False
        )
        made.__dict__.update(STORE)
        sink.handle(made)
    plain = record(fault, "svc", "user/kim/a", "x", level=logging.ERROR, client=False)
    sink.handle(plain)  # unmarked: always passes
    clock.advance(10)
    limiter.flush()
    assert [m.split(":")[0] for m in sink.messages()] == [
        "could not take svc-0's message on user/kim/a",
        "could not take svc-1's message on user/kim/a",
        "could not take svc's message on user/kim/a",
        "suppressed 3 similar messages in 10s",
    ]
    assert sink.records[-1].levelno == logging.ERROR


def test_summary_takes_the_highest_suppressed_level() -> None:
    clock = FakeClock()
    limiter, sink = limited(clock, burst=1)
    for level in (logging.INFO, logging.INFO, logging.WARNING, logging.INFO):
        limiter.filter(record("x %s", 1, level=level))
    clock.advance(10)
    limiter.flush()
    assert [r.levelno for r in sink.records] == [logging.WARNING]


def test_flush_looks_at_most_once_a_second() -> None:
    clock = FakeClock()
    limiter, sink = limited(clock, burst=0, interval_s=0.5)
    limiter.filter(publish(1))
    limiter.flush()  # too early for the key, and it sets the next scan a second away
    clock.advance(0.6)
    limiter.flush()
    assert sink.records == []
    clock.advance(0.5)
    limiter.flush()
    assert len(sink.records) == 1


def test_keys_are_bounded_and_the_rest_share_one_budget() -> None:
    clock = FakeClock()
    limiter, sink = limited(clock, burst=2, max_keys=4)
    results = [limiter.filter(record(f"template {n} %s", n)) for n in range(100)]
    # Four keys pass their own burst; the 96 others share one key's burst of 2.
    assert results[:4] == [True] * 4
    assert sum(results[4:]) == 2
    assert len(limiter._windows) <= 5
    clock.advance(10)
    limiter.flush()
    assert sink.messages() == [
        "suppressed 94 similar messages in 10s: '(messages of more kinds than the rate limit tracks)'"
    ]
    # Once their intervals are over, keys are tracked again.
    assert limiter.filter(record("template 50 %s", 50))
    assert len(limiter._windows) == 1


def test_key_memory_is_bounded_for_long_templates() -> None:
    limiter, _ = limited(FakeClock(), max_keys=8)
    for n in range(50):
        limiter.filter(record(f"{n} " + "x" * 60_000, client=True))
    assert len(limiter._windows) <= 9
    assert all(len(template) <= 200 for _, template in limiter._windows)


def test_flush_reaches_every_live_filter() -> None:
    clock = FakeClock()
    limiter, sink = limited(clock, burst=0)
    limiter.filter(publish(1))
    clock.advance(10)
    flush()
    assert sink.messages() == [SUMMARY_10.format(1)]


def test_filter_is_thread_safe() -> None:
    clock = FakeClock()
    limiter, sink = limited(clock, burst=5)
    passed: list[bool] = []
    lock = threading.Lock()

    def hammer() -> None:
        mine = [limiter.filter(publish(n)) for n in range(2_000)]
        with lock:
            passed.extend(mine)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S)
    assert sum(passed) == 5
    clock.advance(10)
    limiter.flush()
    assert sink.messages() == [SUMMARY_10.format("7,995")]


# --- websockets' handshake failures ---------------------------------------------------------------


class _Peer:
    remote_address = ("192.0.2.7", 40000)


def test_handshake_log_turns_a_clients_failure_into_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ours = logging.getLogger(unique("bridge.test"))
    adapter = logging.LoggerAdapter(
        HandshakeLog(ours, "ws"), {"websocket": _Peer()}
    )  # as websockets wraps it
    try:
        try:
            raise ValueError("unsupported HTTP method; expected GET; got GARBAGE\r\n")
        except ValueError as exc:
            raise InvalidMessage("did not receive a valid HTTP request") from exc
    except InvalidMessage:
        adapter.error("opening handshake failed", exc_info=True)
    [line] = caplog.records
    assert line.name == ours.name
    assert line.levelno == logging.INFO
    assert line.exc_info is None
    assert getattr(line, "client_fault", False)
    assert line.getMessage() == (
        "bad WebSocket handshake from ('192.0.2.7', 40000) on ws: 'did not receive a valid HTTP request;"
        " unsupported HTTP method; expected GET; got GARBAGE\\r\\n'"
    )


def test_handshake_log_keeps_the_traceback_of_our_own_bug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    adapter = logging.LoggerAdapter(
        HandshakeLog(logging.getLogger("bridge.test"), "ws"), {"websocket": _Peer()}
    )
    try:
        raise KeyError("process_request broke")
    except KeyError:
        adapter.error("opening handshake failed", exc_info=True)
    [line] = caplog.records
    assert (line.name, line.levelno, line.getMessage()) == (
        "websockets.server",
        logging.ERROR,
        "opening handshake failed",
    )
    assert line.exc_info is not None
    assert line.__dict__["websocket"].remote_address == ("192.0.2.7", 40000)  # websockets' extra kept


# --- a real broker under attack --------------------------------------------------------------------


class Output:
    """What the installed handler wrote, on a fake clock the test moves."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.stream = io.StringIO()
        self.handler = log_handler(LoggingConfig(), stream=self.stream, clock=self.clock)

    @property
    def text(self) -> str:
        with self.handler.lock or threading.Lock():
            return self.stream.getvalue()

    def lines(self, containing: str = "") -> list[str]:
        return [line for line in self.text.splitlines() if containing in line]

    def summaries(self, template: str) -> list[int]:
        found = re.findall(
            rf"suppressed ([\d,]+) similar messages in 10s: '{re.escape(template)}'", self.text
        )
        return [int(count.replace(",", "")) for count in found]


@pytest.fixture
def output(caplog: pytest.LogCaptureFixture) -> Iterator[Output]:
    """The handler setup_logging installs, on the root logger at INFO, third parties at WARNING."""
    caplog.set_level(logging.INFO)
    for name in QUIET_LOGGERS:
        caplog.set_level(logging.WARNING, logger=name)
    out = Output()
    root = logging.getLogger()
    root.addHandler(out.handler)
    try:
        yield out
    finally:
        root.removeHandler(out.handler)


def assert_one_line_per_record(out: Output) -> None:
    text = out.text
    assert not RAW_CONTROL.search(text), [line for line in text.splitlines() if RAW_CONTROL.search(line)]
    for line in text.splitlines():
        assert LINE_START.match(line), f"not a record of its own: {line!r}"


EVIL_ID = "evil\r\n2026-01-01 00:00:00,000 INFO    bridge.edge.broker: connected admin\x1b[31m\u2028\u202e"


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
def test_control_characters_in_client_ids_are_escaped(
    broker: BrokerThread, clients: Callable[..., Client], output: Output, transport: Transport
) -> None:
    user = unique("user")
    client = clients(broker.port(transport), transport=transport, client_id=EVIL_ID, username=user)
    client.connect()
    client.close()
    refused = clients(
        broker.port(transport),
        transport=transport,
        client_id=EVIL_ID + "2",
        username=user,
        password="not-a-jwt",
    )
    refused.connect(expect=5)
    wait_until(lambda: bool(output.lines("disconnected")), what="the disconnect line")

    assert_one_line_per_record(output)
    escaped = clip(EVIL_ID)
    assert escaped.startswith("'evil\\r\\n2026-01-01")
    # One line per connection, at its end (the connect itself is logged at DEBUG).
    assert output.lines(f"disconnected {escaped} (user {user}) from ")
    assert output.lines(f"refused (malformed): client {clip(EVIL_ID + '2')} from ")


def flood_socket(port: int, transport: Transport, client_id: str, role: Role) -> Callable[[bytes], None]:
    """A connected MQTT client below paho; returns how to send one packet."""
    if transport == "tcp":
        sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
        sock.sendall(authed_connect(client_id, role=role))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        return sock.sendall
    ws = ws_connect(
        f"ws://127.0.0.1:{port}/mqtt",
        subprotocols=["mqtt"],  # type: ignore[list-item]
        compression=None,
        open_timeout=DEADLINE_S,
    )
    ws.send(authed_connect(client_id, role=role))
    assert ws.recv(DEADLINE_S) == b"\x20\x02\x00\x00"
    return ws.send


def publish_qos0(topic: str, payload: bytes) -> bytes:
    return _packet(0x30, _mqtt_str(topic.encode()) + payload)


FLOODS = [
    # Under limits.max_topic_bytes: refused by the ACL, the topic clipped in each line.
    ("user/bob/" + "x" * 200, "acl", "client %s may not publish to %s"),
    # Was: 3,000 forbidden publishes to a 60 KB topic wrote 180 MB of log. Now refused for
    # its length before anything else.
    ("user/bob/" + "x" * 60_000, "topic_too_long", "client %s published to a topic over %d bytes"),
]


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
@pytest.mark.parametrize(("topic", "reason", "template"), FLOODS, ids=["acl", "too_long"])
def test_forbidden_publish_flood_writes_a_few_lines(
    broker: BrokerThread, output: Output, transport: Transport, topic: str, reason: str, template: str
) -> None:
    client_id = unique("attacker")
    send = flood_socket(broker.port(transport), transport, client_id, "subscriber")
    packet = publish_qos0(topic, b"hello")
    for _ in range(3_000):
        send(packet)
    dropped = broker.broker.stats.publishes_dropped
    wait_until(lambda: dropped[reason] >= 3_000, what=f"3,000 drops ({reason})")

    shown = output.lines(template.split("%s ", 1)[1].split(" %", 1)[0])  # the template's fixed words
    assert len(shown) == 10
    assert all(len(line) < 250 for line in shown), shown[0]
    output.clock.advance(10)  # the broker's periodic flush says what was suppressed
    wait_until(lambda: bool(output.summaries(template)), what="the summary")
    assert output.summaries(template) == [3_000 - 10]
    assert len(output.text.encode()) < 16 * 1024
    assert_one_line_per_record(output)


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
def test_invalid_tick_flood_writes_a_few_lines(
    broker: BrokerThread, output: Output, transport: Transport
) -> None:
    """Was: a feed's 3,000 invalid ticks on a 65 KB topic wrote 94 MB of log."""
    client_id = unique("feed")
    send = flood_socket(broker.port(transport), transport, client_id, "feed")
    packet = publish_qos0("market/luno/" + "X" * 200, b"not a tick\n\x1b[31m")
    for _ in range(3_000):
        send(packet)
    stats = broker.broker.stats
    # The feed's publish rate limit drops some first (quietly, counted): what reaches the
    # tick check is what the log shows.
    wait_until(
        lambda: stats.ticks_rejected["not_json"] + stats.publishes_dropped["rate_limited"] >= 3_000,
        what="3,000 ticks handled",
    )
    rejected = stats.ticks_rejected["not_json"]
    assert rejected > 10

    shown = output.lines("dropped tick from")
    assert len(shown) == 10
    assert all(len(line) < 500 for line in shown), shown[0]
    output.clock.advance(10)
    wait_until(lambda: bool(output.summaries("dropped tick from %s on %s: %s")), what="the summary")
    assert output.summaries("dropped tick from %s on %s: %s") == [rejected - 10]
    assert len(output.text.encode()) < 16 * 1024
    assert_one_line_per_record(output)


JUNK = [
    b"GARBAGE / NOPE\r\n\r\n",  # not HTTP
    b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n",  # HTTP without the upgrade
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS hello on the plain port
    b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",  # cut short
]


def drain(sock: socket.socket) -> None:
    with sock:
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass  # closed with our junk unread: a reset


def test_junk_websocket_handshakes_write_a_few_lines_and_no_traceback(
    broker: BrokerThread, output: Output
) -> None:
    """Was: 2,000 junk handshakes wrote 34,000 lines (an ERROR and a traceback each)."""
    sent = 0
    deadline = time.monotonic() + 5.0  # whatever the machine manages, bounded in time
    while sent < 2_000 and time.monotonic() < deadline:
        batch = [
            socket.create_connection(("127.0.0.1", broker.ws_port), timeout=DEADLINE_S) for _ in range(50)
        ]
        for n, sock in enumerate(batch):
            sock.sendall(JUNK[(sent + n) % len(JUNK)])
            sock.shutdown(socket.SHUT_WR)
        for sock in batch:
            drain(sock)  # the broker answers (400, 426) and closes
        sent += len(batch)
    assert sent >= 200
    server = broker.broker._servers["ws"].instance
    assert isinstance(server, WsListener)
    # A failed handshake is logged before its connection is forgotten.
    wait_until(lambda: broker.call(lambda: not server.connections), what="every handshake handled")

    shown = output.lines("bad WebSocket handshake from ('127.0.0.1', ")
    assert len(shown) == 10, output.text
    output.clock.advance(10)
    template = "bad WebSocket handshake from %s on %s: %s"
    wait_until(lambda: bool(output.summaries(template)), what="the summary")
    assert output.summaries(template) == [sent - 10]
    assert "Traceback" not in output.text
    assert len(output.lines()) <= 12, output.text
    assert_one_line_per_record(output)


def test_a_real_websocket_client_still_connects(
    broker: BrokerThread, clients: Callable[..., Client], output: Output
) -> None:
    """The handshake logger changes nothing for a good client."""
    client = clients(broker.ws_port, transport="websockets", role="subscriber")
    client.connect()
    assert client.subscribe("market/#") == [0]
    assert not output.lines("bad WebSocket handshake")


@pytest.mark.parametrize(
    ("events", "said"),
    [
        ("", []),
        ("s", []),
        ("f", [(logging.WARNING, "could not write: 1")]),
        (
            "fff",
            [
                (logging.WARNING, "could not write: 1"),
                (logging.DEBUG, "could not write: 2"),
                (logging.DEBUG, "could not write: 3"),
            ],
        ),
        (
            "ffs",
            [
                (logging.WARNING, "could not write: 1"),
                (logging.DEBUG, "could not write: 2"),
                (logging.WARNING, "writing: working again after 2 failed tries"),
            ],
        ),
        (
            "fsfs",
            [
                (logging.WARNING, "could not write: 1"),
                (logging.WARNING, "writing: working again after 1 failed tries"),
                (logging.WARNING, "could not write: 3"),
                (logging.WARNING, "writing: working again after 1 failed tries"),
            ],
        ),
        ("ss", []),
    ],
)
def test_an_outage_is_logged_when_it_starts_and_when_it_ends(
    events: str, said: list[tuple[int, str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.outage")
    outage = OutageLog(logging.getLogger("test.outage"), "writing")
    for index, event in enumerate(events, 1):
        if event == "f":
            outage.failed("could not write: %d", index)
            assert outage.failing
        else:
            outage.succeeded()
            assert not outage.failing
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == said
    # Store faults: the handler's rate limit applies to them as to every store record.
    assert all(getattr(r, "store_fault", False) for r in caplog.records if "could not" in r.getMessage())
