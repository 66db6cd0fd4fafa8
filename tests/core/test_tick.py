"""Tick validation: what the wire accepts, how it normalises, and the reason codes it refuses with."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.tick import MAX_TICK_BYTES, Tick, format_ts, market_topic, parse_market_topic
from bridge.errors import TickError

VALID: dict[str, Any] = {
    "exchange": "luno",
    "pair": "BTC-ZAR",
    "bid": "1234.5",
    "ask": "1235",
    "last": "1234.9",
    "volume_24h": "12.3",
    "ts": "2026-11-30T11:00:00.123Z",
    "seq": 42,
}
VALID_WIRE = (
    b'{"exchange":"luno","pair":"BTC-ZAR","bid":"1234.5","ask":"1235","last":"1234.9",'
    b'"volume_24h":"12.3","ts":"2026-11-30T11:00:00.123Z","seq":42}'
)


def payload(**changes: Any) -> bytes:
    data = {**VALID, **changes}
    return json.dumps(data).encode()


def without(field: str) -> bytes:
    return json.dumps({k: v for k, v in VALID.items() if k != field}).encode()


def test_valid_wire_round_trips_byte_identical() -> None:
    tick = Tick.decode(VALID_WIRE)
    assert tick.encode() == VALID_WIRE
    assert tick.topic == "market/luno/BTC-ZAR"


@pytest.mark.parametrize(
    ("changes", "field", "expected"),
    [
        ({"bid": "0"}, "bid", "0"),
        ({"bid": "0.000000000000000001"}, "bid", "0.000000000000000001"),
        ({"ask": "1" + "0" * 29}, "ask", "1" + "0" * 29),
        ({"volume_24h": "0.5"}, "volume_24h", "0.5"),
        ({"pair": "USDT-NGN"}, "pair", "USDT-NGN"),
        ({"exchange": "quidax_2"}, "exchange", "quidax_2"),
        ({"seq": 0}, "seq", 0),
        ({"seq": 2**63 - 1}, "seq", 2**63 - 1),
    ],
)
def test_valid_fields_are_kept(changes: dict[str, Any], field: str, expected: object) -> None:
    tick = Tick.decode(payload(**changes))
    assert getattr(tick, field) == expected
    assert Tick.decode(tick.encode()) == tick


@pytest.mark.parametrize(
    ("ts", "wire_ts"),
    [
        ("2026-11-30T11:00:00.123Z", "2026-11-30T11:00:00.123Z"),
        ("2026-11-30T11:00:00Z", "2026-11-30T11:00:00.000Z"),
        ("2026-11-30T13:00:00.5+02:00", "2026-11-30T11:00:00.500Z"),
        ("2026-11-30T08:00:00-03:00", "2026-11-30T11:00:00.000Z"),
        ("2026-11-30T11:00:00.123999+00:00", "2026-11-30T11:00:00.123Z"),
        ("2026-12-01T00:30:00.999999+01:00", "2026-11-30T23:30:00.999Z"),
    ],
)
def test_timestamp_normalised_to_utc_milliseconds(ts: str, wire_ts: str) -> None:
    tick = Tick.decode(payload(ts=ts))
    assert tick.ts.tzinfo == UTC
    assert tick.ts.microsecond % 1000 == 0
    assert json.loads(tick.encode())["ts"] == wire_ts
    # Normalised output is a fixed point: decoding it again changes nothing.
    assert Tick.decode(tick.encode()).encode() == tick.encode()


def test_seq_defaults_to_zero() -> None:
    assert Tick.decode(without("seq")).seq == 0


def test_aware_datetime_is_accepted_directly() -> None:
    moment = datetime(2026, 11, 30, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=3)))
    tick = Tick.model_validate({**VALID, "ts": moment})
    assert tick.ts == datetime(2026, 11, 30, 11, 0, 0, 123000, tzinfo=UTC)


def test_with_seq_returns_a_copy() -> None:
    tick = Tick.decode(VALID_WIRE)
    assert tick.with_seq(7).seq == 7
    assert tick.seq == 42


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        # Decimals: one spelling per value, no sign, no exponent, no specials.
        (payload(bid="1e5"), "bad_decimal"),
        (payload(bid="-1"), "bad_decimal"),
        (payload(bid="01.5"), "bad_decimal"),
        (payload(bid="1."), "bad_decimal"),
        (payload(bid=".5"), "bad_decimal"),
        (payload(bid=""), "bad_decimal"),
        (payload(bid="NaN"), "bad_decimal"),
        (payload(ask="Infinity"), "bad_decimal"),
        (payload(last="1,5"), "bad_decimal"),
        (payload(last=" 1"), "bad_decimal"),
        (payload(volume_24h="1\n"), "bad_decimal"),
        (payload(volume_24h="0." + "1" * 19), "bad_decimal"),
        (payload(ask="1" * 31), "bad_decimal"),
        (payload(bid=None), "bad_decimal"),
        # JSON numbers lose cents: refused whatever their type.
        (payload(bid=1234.5), "float_price"),
        (payload(ask=1235), "float_price"),
        (payload(volume_24h=0), "float_price"),
        (payload(extra=1), "unknown_field"),
        (payload(topic="market/luno/BTC-ZAR"), "unknown_field"),
        (without("bid"), "missing_field"),
        (without("ts"), "missing_field"),
        (without("exchange"), "missing_field"),
        (payload(exchange="Luno"), "bad_exchange"),
        (payload(exchange=""), "bad_exchange"),
        (payload(pair="BTCZAR"), "bad_pair"),
        (payload(pair="btc-zar"), "bad_pair"),
        (payload(ts="2026-11-30T11:00:00"), "bad_timestamp"),
        (payload(ts="2026-11-30"), "bad_timestamp"),
        (payload(ts="yesterday at noon"), "bad_timestamp"),
        (payload(ts=1764500400), "bad_timestamp"),
        (payload(ts=None), "bad_timestamp"),
        (payload(seq=-1), "bad_seq"),
        (payload(seq=True), "bad_seq"),
        (payload(seq=1.0), "bad_seq"),
        (payload(seq="1"), "bad_seq"),
        (payload(seq=2**63), "bad_seq"),
        (b"{not json", "not_json"),
        (b"", "not_json"),
        (b'{"exchange":"luno","pair":"\xff\xfe"}', "not_json"),
        (b"[]", "not_object"),
        (b'"tick"', "not_object"),
        (b"42", "not_object"),
        (b"null", "not_object"),
        (b" " * (MAX_TICK_BYTES + 1), "too_large"),
        # Size is checked first, before any parsing.
        (payload(padding="x" * MAX_TICK_BYTES), "too_large"),
    ],
)
def test_invalid_payloads_are_refused_with_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(TickError) as caught:
        Tick.decode(raw)
    assert caught.value.reason == reason


def test_size_limit_is_inclusive() -> None:
    padded = VALID_WIRE + b" " * (MAX_TICK_BYTES - len(VALID_WIRE))
    assert len(padded) == MAX_TICK_BYTES
    assert Tick.decode(padded).encode() == VALID_WIRE


def test_error_names_the_field() -> None:
    with pytest.raises(TickError) as caught:
        Tick.decode(payload(last="1e5"))
    assert caught.value.detail.startswith("last:")
    assert "bad_decimal" in str(caught.value)


@pytest.mark.parametrize(
    ("topic", "ok"),
    [
        ("market/luno/BTC-ZAR", True),
        ("market/luno/BTC-NGN", False),
        ("market/valr/BTC-ZAR", False),
        ("market/luno/btc-zar", False),
        ("luno/BTC-ZAR", False),
    ],
)
def test_decode_checks_topic(topic: str, ok: bool) -> None:
    if ok:
        assert Tick.decode(VALID_WIRE, topic=topic).topic == topic
    else:
        with pytest.raises(TickError) as caught:
            Tick.decode(VALID_WIRE, topic=topic)
        assert caught.value.reason == "wrong_topic"


def test_validation_comes_before_topic_check() -> None:
    with pytest.raises(TickError) as caught:
        Tick.decode(payload(bid=1), topic="market/valr/ETH-ZAR")
    assert caught.value.reason == "float_price"


@pytest.mark.parametrize(
    ("exchange", "pair", "topic"),
    [
        ("luno", "BTC-ZAR", "market/luno/BTC-ZAR"),
        ("quidax", "USDT-NGN", "market/quidax/USDT-NGN"),
        ("valr", "SOL-ZAR", "market/valr/SOL-ZAR"),
    ],
)
def test_market_topic_and_parse_are_inverse(exchange: str, pair: str, topic: str) -> None:
    assert market_topic(exchange, pair) == topic
    assert parse_market_topic(topic) == (exchange, pair)


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "market/",
        "market/luno",
        "market/luno/",
        "market/luno/BTCZAR",
        "market/luno/btc-zar",
        "market/Luno/BTC-ZAR",
        "market/luno/BTC-ZAR/extra",
        "market/+/BTC-ZAR",
        "market/luno/#",
        "markets/luno/BTC-ZAR",
        "/market/luno/BTC-ZAR",
        "market/1luno/BTC-ZAR",
        "market/luno/B-ZAR",
    ],
)
def test_parse_market_topic_refuses_non_canonical(topic: str) -> None:
    assert parse_market_topic(topic) is None


def test_format_ts_truncates_to_milliseconds() -> None:
    moment = datetime(2026, 11, 30, 13, 0, 0, 999999, tzinfo=timezone(timedelta(hours=2)))
    assert format_ts(moment) == "2026-11-30T11:00:00.999Z"


# Property: any tick built from valid parts survives the wire unchanged.
_decimals = st.from_regex(r"\A(0|[1-9][0-9]{0,29})(\.[0-9]{1,18})?\Z")
_currencies = st.from_regex(r"\A[A-Z0-9]{2,10}\Z")
_timestamps = st.datetimes(
    # A day inside the range on each end, so converting the offset to UTC cannot overflow.
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.builds(
        timezone, st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23))
    ),
)


@st.composite
def valid_ticks(draw: st.DrawFn) -> Tick:
    return Tick(
        exchange=draw(st.from_regex(r"\A[a-z][a-z0-9_]{0,31}\Z")),
        pair=f"{draw(_currencies)}-{draw(_currencies)}",
        bid=draw(_decimals),
        ask=draw(_decimals),
        last=draw(_decimals),
        volume_24h=draw(_decimals),
        ts=draw(_timestamps),
        seq=draw(st.integers(min_value=0, max_value=2**63 - 1)),
    )


@given(valid_ticks())
def test_valid_ticks_round_trip(tick: Tick) -> None:
    wire = tick.encode()
    again = Tick.decode(wire, topic=tick.topic)
    assert again == tick
    assert again.encode() == wire
    assert parse_market_topic(tick.topic) == (tick.exchange, tick.pair)


# Property: the hand-formatted wire form is exactly what json.dumps would write.
@given(valid_ticks(), st.one_of(st.none(), st.integers(min_value=0, max_value=2**63 - 1)))
def test_encode_is_json_dumps_of_to_wire(tick: Tick, seq: int | None) -> None:
    wire = tick.to_wire()
    if seq is not None:
        wire["seq"] = seq
    expected = json.dumps(wire, separators=(",", ":")).encode()
    assert tick.encode(seq) == expected
    assert tick.wire_head() + b'"ts":"' + format_ts(tick.ts).encode() + tick.wire_tail(seq) == expected
    decoded = Tick.decode(expected)
    assert decoded.seq == (tick.seq if seq is None else seq)
    assert decoded.with_seq(tick.seq) == tick


@pytest.mark.parametrize("seq", [None, 0, 1, 42, 2**63 - 1])
def test_encode_with_seq_sets_only_seq(seq: int | None) -> None:
    tick = Tick.decode(VALID_WIRE)
    out = json.loads(tick.encode(seq))
    assert out == {**VALID, "seq": 42 if seq is None else seq}
    assert list(out) == list(VALID)  # key order is the wire order
    assert tick.seq == 42  # encode(seq) does not change the tick
