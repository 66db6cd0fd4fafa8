"""bridge.core.timezones: timestamps rewritten to the subscriber's zone, same instants, idempotent."""

from __future__ import annotations

import json
import zoneinfo
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bridge.core.tick import Tick, format_ts
from bridge.core.timezones import (
    DEFAULT_FIELDS,
    LOCAL_SUFFIX,
    LocalClock,
    Rewritten,
    TopicSwitch,
    is_valid_zone,
    rewrite,
    zone,
)
from tests.conftest import BrokerThread, Client, bridge_config, make_tick, token_for, unique

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
AFRICA = sorted(name for name in zoneinfo.available_timezones() if name.startswith("Africa/"))
ZONES = [
    *AFRICA,
    "UTC",
    "Europe/London",
    "America/New_York",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
]


def _ts(payload: bytes, tz: str, key: str = "ts") -> Any:
    return json.loads(rewrite(payload, tz).payload)[key]


def _one(value: Any, tz: str) -> Any:
    """The rewritten ``ts`` of ``{"ts": value}``."""
    return _ts(json.dumps({"ts": value}).encode(), tz)


def _is_json_container(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data.decode("utf-8")), dict | list)
    except (ValueError, RecursionError):
        return False


# --- properties --------------------------------------------------------------------------------

aware = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2100, 12, 31), timezones=st.timezones()
)


def test_zone_list_covers_africa() -> None:
    assert len(AFRICA) >= 50
    assert {"Africa/Lagos", "Africa/Casablanca", "Africa/Windhoek", "Africa/Juba"} <= set(AFRICA)


@given(moment=aware, tz=st.sampled_from(ZONES), fraction=st.booleans())
def test_rewritten_ts_is_the_same_instant(moment: datetime, tz: str, fraction: bool) -> None:
    text = moment.isoformat(timespec="milliseconds" if fraction else "seconds")
    out = _one(text, tz)
    back = datetime.fromisoformat(out)
    assert back == datetime.fromisoformat(text)  # aware comparison: same instant
    assert back.utcoffset() == back.astimezone(zone(tz)).utcoffset()
    assert ("." in out) is fraction


@given(moment=aware, tz=st.sampled_from(ZONES))
def test_epoch_sibling_is_the_same_instant(moment: datetime, tz: str) -> None:
    millis = (moment - EPOCH) // timedelta(milliseconds=1)
    seconds = millis // 1000
    cases = [(seconds, seconds * 1000)]  # |seconds| <= 1e11 over 1900..2100: read as seconds
    if abs(millis) > 1e11:  # within ~3 years of 1970 a millisecond count reads as seconds
        cases.append((millis, millis))
    for value, expected_ms in cases:
        out = json.loads(rewrite(json.dumps({"at": value}).encode(), tz).payload)
        local = datetime.fromisoformat(out["at_local"])
        assert out["at"] == value
        assert (local - EPOCH) // timedelta(milliseconds=1) == expected_ms
        assert local.utcoffset() == local.astimezone(zone(tz)).utcoffset()


@given(data=st.binary())
def test_non_json_bytes_pass_through(data: bytes) -> None:
    assume(not _is_json_container(data))
    assert rewrite(data, "Africa/Lagos") == Rewritten(data, False)


@given(data=st.binary().map(lambda rest: b" {" + rest))
def test_broken_json_objects_pass_through(data: bytes) -> None:
    assume(not _is_json_container(data))
    assert rewrite(data, "Africa/Nairobi") == Rewritten(data, False)


_stamps = st.one_of(
    aware.map(lambda moment: moment.isoformat(timespec="milliseconds")),
    aware.map(lambda moment: moment.isoformat(timespec="seconds")),
    aware.map(lambda moment: moment.replace(tzinfo=None).isoformat()),
    st.integers(min_value=-(10**13), max_value=10**13),
    st.floats(min_value=-1e13, max_value=1e13),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    _stamps,
)
_keys = st.one_of(
    st.sampled_from(["ts", "time", "at", "created", "timestamp", "ts_local", "at_local", "tz", "x"]),
    st.text(max_size=4),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=20,
)
_containers = st.one_of(st.lists(_json, max_size=4), st.dictionaries(_keys, _json, max_size=6))


@given(value=_containers, tz=st.sampled_from(ZONES), other=st.sampled_from(ZONES))
def test_rewrite_is_idempotent_and_keeps_instants(value: Any, tz: str, other: str) -> None:
    once = rewrite(json.dumps(value).encode(), tz)
    assert once.rewritten
    twice = rewrite(once.payload, tz)
    assert twice == once
    # Another zone moves no instant: converting both back to UTC gives identical documents.
    assert (
        rewrite(rewrite(once.payload, other).payload, "UTC").payload == rewrite(once.payload, "UTC").payload
    )


_plain_keys = st.text(max_size=6).filter(lambda key: key not in DEFAULT_FIELDS and key != "tz")
_plain = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text()
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_plain_keys, inner, max_size=4),
    max_leaves=20,
)


@given(value=st.dictionaries(_plain_keys, _plain, max_size=6))
def test_other_values_round_trip_exactly(value: dict[str, Any]) -> None:
    out = json.loads(rewrite(json.dumps(value).encode(), "Africa/Cairo").payload)
    assert out == {**value, "tz": "Africa/Cairo"}
    assert [repr(v) for v in out.values()][:-1] == [repr(v) for v in value.values()]


# --- zone tables -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tz", "utc", "local"),
    [
        # Egypt: DST from the last Friday of April 00:00 (+02 -> +03) ...
        ("Africa/Cairo", "2024-04-25T12:00:00.000Z", "2024-04-25T14:00:00.000+02:00"),
        ("Africa/Cairo", "2024-04-25T21:59:59.999Z", "2024-04-25T23:59:59.999+02:00"),
        ("Africa/Cairo", "2024-04-25T22:00:00.000Z", "2024-04-26T01:00:00.000+03:00"),
        ("Africa/Cairo", "2024-04-26T12:00:00.000Z", "2024-04-26T15:00:00.000+03:00"),
        # ... to the last Thursday of October 24:00 (+03 -> +02).
        ("Africa/Cairo", "2024-10-31T12:00:00.000Z", "2024-10-31T15:00:00.000+03:00"),
        ("Africa/Cairo", "2024-10-31T20:59:59.999Z", "2024-10-31T23:59:59.999+03:00"),
        ("Africa/Cairo", "2024-10-31T21:00:00.000Z", "2024-10-31T23:00:00.000+02:00"),
        ("Africa/Cairo", "2024-11-01T12:00:00.000Z", "2024-11-01T14:00:00.000+02:00"),
        ("Africa/Cairo", "2025-04-24T12:00:00.000Z", "2025-04-24T14:00:00.000+02:00"),
        ("Africa/Cairo", "2025-04-24T22:00:00.000Z", "2025-04-25T01:00:00.000+03:00"),
        ("Africa/Cairo", "2025-04-25T12:00:00.000Z", "2025-04-25T15:00:00.000+03:00"),
        ("Africa/Cairo", "2025-10-30T12:00:00.000Z", "2025-10-30T15:00:00.000+03:00"),
        ("Africa/Cairo", "2025-10-30T21:00:00.000Z", "2025-10-30T23:00:00.000+02:00"),
        ("Africa/Cairo", "2025-10-31T12:00:00.000Z", "2025-10-31T14:00:00.000+02:00"),
        # Morocco: +01, but +00 around Ramadan (switches at 02:00 UTC per tzdata).
        ("Africa/Casablanca", "2025-02-22T12:00:00.000Z", "2025-02-22T13:00:00.000+01:00"),
        ("Africa/Casablanca", "2025-02-23T01:59:59.999Z", "2025-02-23T02:59:59.999+01:00"),
        ("Africa/Casablanca", "2025-02-23T02:00:00.000Z", "2025-02-23T02:00:00.000+00:00"),
        ("Africa/Casablanca", "2025-03-15T12:00:00.000Z", "2025-03-15T12:00:00.000+00:00"),
        ("Africa/Casablanca", "2025-04-06T01:59:59.999Z", "2025-04-06T01:59:59.999+00:00"),
        ("Africa/Casablanca", "2025-04-06T02:00:00.000Z", "2025-04-06T03:00:00.000+01:00"),
        ("Africa/Casablanca", "2025-04-07T12:00:00.000Z", "2025-04-07T13:00:00.000+01:00"),
        ("Africa/Casablanca", "2026-02-14T12:00:00.000Z", "2026-02-14T13:00:00.000+01:00"),
        ("Africa/Casablanca", "2026-02-15T02:00:00.000Z", "2026-02-15T02:00:00.000+00:00"),
        ("Africa/Casablanca", "2026-03-21T12:00:00.000Z", "2026-03-21T12:00:00.000+00:00"),
        ("Africa/Casablanca", "2026-03-22T02:00:00.000Z", "2026-03-22T03:00:00.000+01:00"),
        ("Africa/Casablanca", "2026-03-23T12:00:00.000Z", "2026-03-23T13:00:00.000+01:00"),
        # Namibia: +01 winter time until 2017, +02 all year since.
        ("Africa/Windhoek", "2016-01-15T12:00:00Z", "2016-01-15T14:00:00+02:00"),
        ("Africa/Windhoek", "2016-07-01T12:00:00Z", "2016-07-01T13:00:00+01:00"),
        ("Africa/Windhoek", "2018-07-01T12:00:00Z", "2018-07-01T14:00:00+02:00"),
        ("Africa/Windhoek", "2026-07-01T12:00:00Z", "2026-07-01T14:00:00+02:00"),
    ],
)
def test_dst_and_history(tz: str, utc: str, local: str) -> None:
    assert _one(utc, tz) == local


@pytest.mark.parametrize(
    ("tz", "offset"),
    [
        ("Africa/Lagos", "+01:00"),
        ("Africa/Nairobi", "+03:00"),
        ("Africa/Johannesburg", "+02:00"),
        ("Africa/Accra", "+00:00"),
        ("Africa/Addis_Ababa", "+03:00"),
        ("Africa/Algiers", "+01:00"),
        ("Africa/Tunis", "+01:00"),
        ("Africa/Kinshasa", "+01:00"),
        ("Africa/Dar_es_Salaam", "+03:00"),
        ("Africa/Kampala", "+03:00"),
        ("Africa/Harare", "+02:00"),
        ("Africa/Khartoum", "+02:00"),
        ("UTC", "+00:00"),
    ],
)
@pytest.mark.parametrize("day", ["2026-01-15", "2026-07-15"])
def test_zones_without_dst(tz: str, offset: str, day: str) -> None:
    hour = 12 + int(offset[1:3]) * (1 if offset[0] == "+" else -1)
    assert _one(f"{day}T12:00:00.250Z", tz) == f"{day}T{hour:02d}:00:00.250{offset}"


def test_a_real_tick_for_lagos() -> None:
    tick = Tick(
        exchange="luno",
        pair="BTC-ZAR",
        bid="1234.5",
        ask="1235",
        last="1234.9",
        volume_24h="12.3",
        ts="2026-11-30T11:00:00.123Z",
        seq=42,
    )
    assert rewrite(tick.encode(), "Africa/Lagos") == Rewritten(
        b'{"exchange":"luno","pair":"BTC-ZAR","bid":"1234.5","ask":"1235","last":"1234.9",'
        b'"volume_24h":"12.3","ts":"2026-11-30T12:00:00.123+01:00","seq":42,"tz":"Africa/Lagos"}',
        True,
    )


# --- rules -------------------------------------------------------------------------------------


def test_nested_fields_at_any_depth() -> None:
    payload = b'{"fills":[{"px":"1","time":"2026-11-30T11:00:00Z","meta":{"created":"2026-11-30T11:00:00.5+00:00"}}]}'
    assert rewrite(payload, "Africa/Nairobi").payload == (
        b'{"fills":[{"px":"1","time":"2026-11-30T14:00:00+03:00",'
        b'"meta":{"created":"2026-11-30T14:00:00.500+03:00"}}],"tz":"Africa/Nairobi"}'
    )


def test_top_level_array_gets_no_tz() -> None:
    assert rewrite(b' [{"at":"2026-11-30T11:00:00Z"}, 1] ', "Africa/Accra") == Rewritten(
        b'[{"at":"2026-11-30T11:00:00+00:00"},1]', True
    )


def test_epoch_seconds_and_milliseconds_gain_siblings() -> None:
    payload = b'{"ts":1796036400,"x":1,"created":1796036400123,"time":1796036400.5}'
    assert rewrite(payload, "Africa/Lagos").payload == (
        b'{"ts":1796036400,"ts_local":"2026-11-30T12:00:00.000+01:00","x":1,'
        b'"created":1796036400123,"created_local":"2026-11-30T12:00:00.123+01:00",'
        b'"time":1796036400.5,"time_local":"2026-11-30T12:00:00.500+01:00","tz":"Africa/Lagos"}'
    )


def test_epoch_threshold_and_negative_values() -> None:
    assert _ts(b'{"ts":100000000000}', "UTC", "ts_local") == "5138-11-16T09:46:40.000+00:00"
    assert _ts(b'{"ts":100000000001}', "UTC", "ts_local") == "1973-03-03T09:46:40.001+00:00"
    assert _ts(b'{"ts":-86400}', "UTC", "ts_local") == "1969-12-31T00:00:00.000+00:00"
    assert _ts(b'{"ts":0}', "Africa/Lagos", "ts_local") == "1970-01-01T01:00:00.000+01:00"


@pytest.mark.parametrize("value", [b"1e300", b"-1e17", b"99999999999999999999999", b"400000000000000000"])
def test_out_of_range_numbers_gain_no_sibling(value: bytes) -> None:
    out = rewrite(b'{"ts":' + value + b"}", "UTC")
    assert out.payload == b'{"ts":' + json.dumps(json.loads(value)).encode() + b',"tz":"UTC"}'
    assert "ts" + LOCAL_SUFFIX not in json.loads(out.payload)


def test_bools_are_not_epochs() -> None:
    assert rewrite(b'{"ts":true}', "UTC").payload == b'{"ts":true,"tz":"UTC"}'


@pytest.mark.parametrize(
    "payload",
    [
        b'{"ts_local":"old","a":1,"ts":0,"b":2}',  # an earlier copy moves to right after ts
        b'{"a":1,"ts":0,"ts_local":"old","b":2}',  # a copy in place is replaced
        b'{"a":1,"ts":0,"b":2,"ts_local":"old"}',  # a later copy is dropped
    ],
)
def test_stale_sibling_is_replaced(payload: bytes) -> None:
    assert rewrite(payload, "Africa/Nairobi").payload == (
        b'{"a":1,"ts":0,"ts_local":"1970-01-01T03:00:00.000+03:00","b":2,"tz":"Africa/Nairobi"}'
    )


def test_stale_sibling_is_kept_when_no_new_one() -> None:
    payload = b'{"ts":1e300,"ts_local":"old"}'
    assert rewrite(payload, "UTC").payload == b'{"ts":1e+300,"ts_local":"old","tz":"UTC"}'


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-30T11:00:00",  # naive
        "2026-11-30T11:00:00.123",  # naive with fraction
        "2026-11-30",  # a date
        "11:00:00Z",  # a time alone
        "yesterday",
        "now",
        "",
        "2026-13-01T00:00:00Z",  # no 13th month
        "2026-11-30T11:00:00Z " + "x" * 80,
    ],
)
def test_naive_and_non_timestamp_strings_untouched(value: str) -> None:
    assert _one(value, "Africa/Lagos") == value
    assert json.loads(rewrite(json.dumps({"time": value}).encode(), "Africa/Lagos").payload)["time"] == value


def test_offsets_and_precision() -> None:
    assert _one("2026-11-30T11:00:00.123456Z", "Africa/Lagos") == "2026-11-30T12:00:00.123+01:00"
    assert _one("2026-11-30T13:30:00+02:30", "Africa/Lagos") == "2026-11-30T12:00:00+01:00"
    assert _one("2026-11-30T12:00:00+01:00", "UTC") == "2026-11-30T11:00:00+00:00"
    assert _one("0001-01-01T00:30:00+01:00", "UTC") == "0001-01-01T00:30:00+01:00"  # before year 1 in UTC


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"   ",
        b"42",
        b'"2026-11-30T11:00:00Z"',
        b"null",
        b"\x00\x01\x02binary",
        b"{\xff}",
        b'{"ts":"\xc3"}',
        b'{"ts":NaN}',
        b"[Infinity, 1]",
        b"[-Infinity]",
        b"[1e999]",
        b'{"t":"\\ud800"}',
        b'{"ts":"2026-11-30T11:00:00Z"',
        b"\xef\xbb\xbf{}",
        '{"ts":"2026-11-30T11:00:00Z"}'.encode("utf-16"),
        b"[" * 100_000 + b"]" * 100_000,
        b"[" + b"9" * 5000 + b"]",
    ],
)
def test_pass_through(payload: bytes) -> None:
    assert rewrite(payload, "Africa/Lagos") == Rewritten(payload, False)


def test_non_ascii_and_floats_survive() -> None:
    payload = '{"name":"Tèmítọ́pẹ́ ₦","p":0.1,"q":1e-7,"big":123456789012345678901234567890}'.encode()
    assert (
        rewrite(payload, "Africa/Lagos").payload
        == (
            '{"name":"Tèmítọ́pẹ́ ₦","p":0.1,"q":1e-07,"big":123456789012345678901234567890,"tz":"Africa/Lagos"}'
        ).encode()
    )


def test_tz_is_added_at_the_end_or_overwritten_in_place() -> None:
    assert rewrite(b"{}", "Africa/Tunis").payload == b'{"tz":"Africa/Tunis"}'
    assert rewrite(b'{"tz":"UTC","a":1}', "Africa/Tunis").payload == b'{"tz":"Africa/Tunis","a":1}'
    assert rewrite(b'{"a":{"tz":"UTC"}}', "Africa/Tunis").payload == b'{"a":{"tz":"UTC"},"tz":"Africa/Tunis"}'


def test_depth_limit() -> None:
    stamp = "2026-11-30T11:00:00Z"
    value: dict[str, Any] = {"ts": stamp}
    for _ in range(39):
        value = {"ts": stamp, "in": value}  # 40 nested objects, the top one at depth 1
    out: Any = json.loads(rewrite(json.dumps(value).encode(), "Africa/Lagos").payload)
    seen = []
    while out is not None:
        seen.append(out["ts"])
        out = out.get("in")
    assert seen == ["2026-11-30T12:00:00+01:00"] * 32 + [stamp] * 8


def test_depth_limit_counts_arrays() -> None:
    value: Any = {"ts": "2026-11-30T11:00:00Z"}
    for _ in range(31):
        value = [value]
    # 31 arrays then the object at depth 32: still rewritten; one more array and it is not.
    assert _is_rewritten(value)
    assert not _is_rewritten([value])


def _is_rewritten(value: Any) -> bool:
    return b"+01:00" in rewrite(json.dumps(value).encode(), "Africa/Lagos").payload


def test_custom_fields() -> None:
    payload = b'{"ts":"2026-11-30T11:00:00Z","when":"2026-11-30T11:00:00Z","epoch":0}'
    out = rewrite(payload, "Africa/Johannesburg", fields=frozenset({"when", "epoch"}))
    assert out.payload == (
        b'{"ts":"2026-11-30T11:00:00Z","when":"2026-11-30T13:00:00+02:00","epoch":0,'
        b'"epoch_local":"1970-01-01T02:00:00.000+02:00","tz":"Africa/Johannesburg"}'
    )
    assert rewrite(payload, "UTC", fields=frozenset()).payload == payload[:-1] + b',"tz":"UTC"}'


def test_unknown_zone_raises_even_for_pass_through_payloads() -> None:
    with pytest.raises(ValueError, match="Mars/Base"):
        rewrite(b"binary", "Mars/Base")


# --- zones -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("Africa/Lagos", True),
        ("UTC", True),
        ("Africa/Casablanca", True),
        ("Mars/Base", False),
        ("", False),
        ("../etc/passwd", False),
        ("Africa/", False),
        ("Africa", False),
        ("/usr/share/zoneinfo/UTC", False),
        ("africa/lagos", False),
        ("Africa/../Africa/Lagos", False),
    ],
)
def test_is_valid_zone(name: str, valid: bool) -> None:
    assert is_valid_zone(name) is valid


def test_zone_is_cached_and_raises_value_error() -> None:
    assert zone("Africa/Lagos") is zone("Africa/Lagos")
    assert zone("Africa/Lagos").key == "Africa/Lagos"
    with pytest.raises(ValueError, match="unknown time zone"):
        zone("Africa/")
    with pytest.raises(ValueError, match="unknown time zone"):
        zone("Africa")


# --- topic switch ------------------------------------------------------------------------------


SWITCH = TopicSwitch(
    [
        ("market/luno/BTC-ZAR", True),
        ("market/luno/#", False),
        ("market/+/ETH-NGN", False),
        ("user/+/raw", False),
        ("#", True),
    ]
)


@pytest.mark.parametrize(
    ("topic", "enabled"),
    [
        ("market/luno/BTC-ZAR", True),  # first rule beats the later '#' off
        ("market/luno/ETH-ZAR", False),
        ("market/luno", False),  # '#' also matches the parent level
        ("market/valr/ETH-NGN", False),
        ("market/valr/BTC-NGN", True),
        ("user/abc/raw", False),
        ("user/abc/raw/more", True),
        ("$SYS/broker/load", True),  # not matched by '#': the default applies
    ],
)
def test_topic_switch_first_match_wins(topic: str, enabled: bool) -> None:
    assert SWITCH.enabled(topic) is enabled
    assert SWITCH.enabled(topic) is enabled  # memoised answer is the same


def test_topic_switch_defaults_on() -> None:
    assert TopicSwitch().enabled("market/luno/BTC-ZAR") is True
    assert TopicSwitch([("market/#", False)]).enabled("user/x/alerts") is True
    assert TopicSwitch([("market/#", False)]).enabled("market/luno/BTC-ZAR") is False


@pytest.mark.parametrize("bad", ["market/#/x", "market/lu+", "", "a\x00b"])
def test_topic_switch_refuses_bad_filters(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid topic filter"):
        TopicSwitch([(bad, True)])


def test_topic_switch_memo_is_bounded() -> None:
    switch = TopicSwitch([("market/+/BTC-ZAR", False)])
    for index in range(25_000):
        assert switch.enabled(f"market/x{index}/BTC-ZAR") is False
        assert len(switch._memo) <= 10_000
    assert switch.enabled("market/luno/ETH-ZAR") is True
    assert switch.enabled("market/luno/BTC-ZAR") is False


# --- LocalClock: the broker's per-tick conversion, held to rewrite() -------------------------

ODD_ZONES = ["Asia/Kathmandu", "America/St_Johns", "Africa/Casablanca", "Africa/Windhoek"]
CLOCK_ZONES = [*AFRICA, *ODD_ZONES, "UTC", "Australia/Lord_Howe", "Pacific/Chatham"]
# One clock for every example, as in the broker: its per-zone cache is part of what is tested.
_SHARED_CLOCK = LocalClock()


def _rewritten_ts(moment: datetime, tz: str) -> str:
    """What rewrite() makes of a tick's ``ts`` (UTC, milliseconds, ``Z``) in ``tz``."""
    return str(_one(format_ts(moment), tz))


# Tick timestamps are UTC (Tick normalises them). 1900 reaches the LMT-era offsets with
# seconds (e.g. Africa/Monrovia -00:44:30 until 1972), which the clock does not cache.
utc_moments = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2100, 12, 31), timezones=st.just(UTC)
)


@given(moment=utc_moments, tz=st.sampled_from(CLOCK_ZONES))
def test_local_ms_equals_rewrite(moment: datetime, tz: str) -> None:
    expected = _rewritten_ts(moment, tz)
    assert LocalClock().local_ms(moment, tz) == expected
    assert _SHARED_CLOCK.local_ms(moment, tz) == expected


@given(
    base=utc_moments,
    steps=st.lists(st.integers(min_value=-2_500, max_value=2_500), min_size=1, max_size=8),
    tz=st.sampled_from(CLOCK_ZONES),
)
def test_local_ms_cache_within_and_across_seconds(base: datetime, steps: list[int], tz: str) -> None:
    # Nearby instants in one zone, in and out of the cached second, in any order.
    clock = LocalClock()
    for step in steps:
        moment = base + timedelta(milliseconds=step)
        assert clock.local_ms(moment, tz) == _rewritten_ts(moment, tz)


@pytest.mark.parametrize(
    ("utc", "tz"),
    [
        # Around transitions: St John's (-03:30 / -02:30), Casablanca's Ramadan switch,
        # Lord Howe's half-hour DST, a leap day, LMT offsets with seconds.
        ("2026-03-08T05:29:59.999Z", "America/St_Johns"),
        ("2026-03-08T05:30:00.000Z", "America/St_Johns"),
        ("2026-11-01T03:29:59.999Z", "America/St_Johns"),
        ("2026-11-01T03:30:00.000Z", "America/St_Johns"),
        ("2026-02-15T01:59:59.999Z", "Africa/Casablanca"),
        ("2026-02-15T02:00:00.000Z", "Africa/Casablanca"),
        ("2026-04-05T14:59:59.999Z", "Australia/Lord_Howe"),
        ("2026-04-05T15:00:00.000Z", "Australia/Lord_Howe"),
        ("2028-02-29T23:59:59.999Z", "Asia/Kathmandu"),
        ("1960-06-01T12:00:00.500Z", "Africa/Monrovia"),
        ("1905-01-01T00:00:00.001Z", "Africa/Abidjan"),
    ],
)
def test_local_ms_at_transitions(utc: str, tz: str) -> None:
    moment = datetime.fromisoformat(utc)
    clock = LocalClock()
    before = moment - timedelta(milliseconds=1)
    # The cached second of the instant before must not leak into the one after.
    for instant in (before, moment, before, moment):
        assert clock.local_ms(instant, tz) == _rewritten_ts(instant, tz)


@pytest.mark.parametrize(
    ("moment", "tz"),
    [
        (datetime(1, 1, 1, 0, 0, 0, 500_000, tzinfo=UTC), "America/St_Johns"),
        (datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC), "Asia/Kathmandu"),
    ],
)
def test_local_ms_is_none_where_rewrite_leaves_ts_unchanged(moment: datetime, tz: str) -> None:
    # Past year 1 or 9999 once converted: rewrite() keeps the UTC text, the clock says None.
    assert LocalClock().local_ms(moment, tz) is None
    assert _rewritten_ts(moment, tz) == format_ts(moment)


def test_local_ms_tells_apart_the_two_instants_of_a_repeated_wall_time() -> None:
    # local_ms takes any aware moment. Casablanca goes from +01 back to +00 at 03:00 on
    # 2026-02-15, so 02:30 happens twice; fold picks which. Two different instants, an hour apart.
    casablanca = zone("Africa/Casablanca")
    earlier = datetime(2026, 2, 15, 2, 30, 0, 123_000, tzinfo=casablanca, fold=0)  # 01:30:00.123Z
    later = datetime(2026, 2, 15, 2, 30, 0, 456_000, tzinfo=casablanca, fold=1)  # 02:30:00.456Z
    assert later.astimezone(UTC) - earlier.astimezone(UTC) == timedelta(hours=1, milliseconds=333)
    clock = LocalClock()
    assert clock.local_ms(earlier, "Africa/Lagos") == _rewritten_ts(earlier, "Africa/Lagos")
    assert clock.local_ms(later, "Africa/Lagos") == _rewritten_ts(later, "Africa/Lagos")


# --- the broker's localised tick is rewrite() of the UTC tick, byte for byte ------------------

E2E_ZONES = [*ODD_ZONES, "Africa/Lagos", "UTC"]
E2E_STAMPS = [
    "2026-11-30T11:00:00.000Z",
    "2026-11-30T11:00:00.999Z",  # same second, so the broker's cached conversion is reused
    "2026-11-30T11:00:01.001Z",
    "2026-03-08T05:29:59.999Z",  # St John's springs forward
    "2026-03-08T05:30:00.000Z",
    "2026-02-15T01:59:59.999Z",  # Casablanca's Ramadan switch
    "2026-02-15T02:00:00.000Z",
    "2028-02-29T23:59:59.999Z",
    "2026-11-30T13:00:00.123+02:00",  # a feed's own offset, normalised to UTC first
]


def test_broker_localised_ticks_equal_rewrite_of_the_utc_tick(clients: Callable[..., Client]) -> None:
    with BrokerThread(bridge_config()) as broker:
        subscribers: dict[str, Client] = {}
        for index, tz in enumerate(E2E_ZONES):
            user = unique("zoned")
            sub = clients(
                broker.ws_port if index % 2 else broker.tcp_port,
                transport="websockets" if index % 2 else "tcp",
                username=user,
                password=token_for(user, "subscriber", tz=tz),
            )
            sub.connect()
            # QoS 1 for half of them: the direct QoS 1 path localises the same way.
            sub.subscribe("market/#", qos=index % 2)
            subscribers[tz] = sub
        feed = clients(broker.tcp_port, role="feed")
        feed.connect()
        ticks = [make_tick(last=str(index + 1), ts=stamp) for index, stamp in enumerate(E2E_STAMPS)]
        for tick in ticks:
            feed.publish(tick.topic, tick.encode(), qos=1)
        for tz, sub in subscribers.items():
            got = [message.payload for message in sub.expect(len(ticks))]
            expected = [rewrite(tick.encode(seq), tz).payload for seq, tick in enumerate(ticks, 1)]
            assert got == expected, tz


@pytest.mark.parametrize(
    ("rules", "always_on"),
    [
        ([], True),
        ([("market/#", True)], True),
        ([("market/#", True), ("user/#", False)], False),
        ([("market/luno/#", False), ("market/#", True)], False),
    ],
)
def test_always_on_only_when_no_rule_switches_off(rules: list[tuple[str, bool]], always_on: bool) -> None:
    switch = TopicSwitch(rules)
    assert switch.always_on is always_on
    if always_on:
        assert all(switch.enabled(topic) for topic in ("market/luno/BTC-ZAR", "user/u/x", "service/y"))
