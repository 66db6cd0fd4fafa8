"""The timezone plugin without a broker: on_deliver per (payload, zone, topic), and the tick
fast path held byte-for-byte to what on_deliver (rewrite) gives for the same tick."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.hooks import Hooks, OnDeliver
from bridge.core.tick import Tick, TickParts, format_ts
from bridge.core.timezones import LocalClock
from broker_plugins.timezone import TimezonePlugin

LUNO = "market/luno/BTC-ZAR"
TICK = Tick(
    exchange="luno",
    pair="BTC-ZAR",
    bid="1",
    ask="2",
    last="1.5",
    volume_24h="10",
    ts="2026-11-30T11:00:00.123Z",
)


def parts_of(tick: Tick, seq: int = 7) -> TickParts:
    second, ms = LocalClock.split(tick.ts)
    ts = format_ts(tick.ts)
    head, tail = tick.wire_head(), tick.wire_tail(seq)
    return TickParts(tick.encode(seq), head, ts, tail, second, ms)


@pytest.mark.parametrize(
    ("payload", "zone", "topic", "rules", "expected"),
    [
        # No zone: as published, whatever the payload.
        (b'{"ts":"2026-11-30T11:00:00Z"}', None, "user/u/x", [], b'{"ts":"2026-11-30T11:00:00Z"}'),
        (b"\xff binary", None, "user/u/x", [], b"\xff binary"),
        # A zone: timestamps converted and the zone named.
        (
            b'{"ts":"2026-11-30T11:00:00Z"}',
            "Africa/Lagos",
            "user/u/x",
            [],
            b'{"ts":"2026-11-30T12:00:00+01:00","tz":"Africa/Lagos"}',
        ),
        (
            b'{"at":1796036400}',
            "Africa/Johannesburg",
            "service/s/x",
            [],
            b'{"at":1796036400,"at_local":"2026-11-30T13:00:00.000+02:00","tz":"Africa/Johannesburg"}',
        ),
        # Not JSON: passed through unchanged.
        (b"plain text", "Africa/Lagos", "user/u/x", [], b"plain text"),
        # A topic switched off by a rule: unchanged; the first matching rule wins.
        (b'{"ts":"2026-11-30T11:00:00Z"}', "Africa/Lagos", "user/u/raw", [("user/+/raw", False)], None),
        (
            b'{"ts":"2026-11-30T11:00:00Z"}',
            "UTC",
            "user/u/raw",
            [("user/u/#", True), ("user/+/raw", False)],
            b'{"ts":"2026-11-30T11:00:00+00:00","tz":"UTC"}',
        ),
    ],
)
def test_on_deliver(
    payload: bytes, zone: str | None, topic: str, rules: list[tuple[str, bool]], expected: bytes | None
) -> None:
    plugin = TimezonePlugin(rules=rules)
    assert plugin.on_deliver(payload, zone, topic) == (payload if expected is None else expected)


@pytest.mark.parametrize(
    ("payload", "zone", "counts"),
    [
        (b'{"ts":"2026-11-30T11:00:00Z"}', "Africa/Lagos", [True]),
        (b'{"price":"1"}', "Africa/Lagos", [True]),  # re-serialised, gains "tz"
        (b"not json", "Africa/Lagos", [False]),
        (b'{"ts":"2026-11-30T11:00:00Z"}', None, []),  # nothing done, nothing counted
    ],
)
def test_every_rewrite_and_pass_through_is_counted(
    payload: bytes, zone: str | None, counts: list[bool]
) -> None:
    seen: list[bool] = []
    TimezonePlugin(counted=seen.append).on_deliver(payload, zone, "user/u/x")
    assert seen == counts


def test_an_unknown_zone_fails_loudly() -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        TimezonePlugin().on_deliver(b"{}", "Mars/Olympus", "user/u/x")


def test_it_is_an_on_deliver_hook() -> None:
    plugin = TimezonePlugin()
    assert isinstance(plugin, OnDeliver)
    hooks = Hooks([plugin])
    assert hooks.deliver == [plugin]
    out = hooks.on_deliver(b'{"ts":"2026-11-30T11:00:00Z"}', "Africa/Lagos", "user/u/x")
    assert json.loads(out)["tz"] == "Africa/Lagos"


@pytest.mark.parametrize(
    ("fields", "rules", "zone"),
    [
        (("ts",), [], "Africa/Lagos"),
        (
            ("ts", "timestamp", "time", "created", "at"),
            [],
            "America/St_Johns",
        ),  # the default: ts only on a tick
        (("ts", "seq"), [], "Asia/Kolkata"),  # another tick key: the generic rewrite
        (("created",), [], "Africa/Lagos"),  # ts not rewritten, the zone still named
        (("ts",), [("market/#", False)], "Africa/Lagos"),  # switched off: as published
        (("ts",), [], None),
    ],
)
def test_tick_fast_path_equals_on_deliver(
    fields: tuple[str, ...], rules: list[tuple[str, bool]], zone: str | None
) -> None:
    plugin = TimezonePlugin(fields=fields, rules=rules)
    parts = parts_of(TICK)
    assert plugin.on_deliver_tick(parts, zone, LUNO) == plugin.on_deliver(parts.data, zone, LUNO)


@pytest.mark.parametrize(
    ("fields", "rules", "zone"),
    [
        (("ts",), [], "Africa/Lagos"),
        (("ts", "seq"), [], "Asia/Kolkata"),  # another tick key: the generic rewrite, per tick
        (("created",), [], "Africa/Lagos"),  # ts not rewritten, the zone still named
        (("ts",), [("market/luno/#", False)], "Africa/Lagos"),  # one exchange switched off
    ],
)
def test_the_batch_equals_the_fast_path_tick_by_tick(
    fields: tuple[str, ...], rules: list[tuple[str, bool]], zone: str
) -> None:
    counts: list[bool] = []
    plugin = TimezonePlugin(fields=fields, rules=rules, counted=counts.append)
    ticks = [
        (
            f"market/{exchange}/T{i}-ZAR",
            parts_of(TICK.model_copy(update={"ts": TICK.ts + timedelta(seconds=i)}), i),
        )
        for i, exchange in enumerate(["luno", "valr", "luno", "quidax"])
    ]
    batch = plugin.on_deliver_ticks(ticks, zone)
    batch_counts = counts[:]
    counts.clear()
    assert batch == [plugin.on_deliver_tick(parts, zone, topic) for topic, parts in ticks]
    assert batch_counts == counts  # the same rewrites counted


@given(
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)),
    st.sampled_from(["UTC", "Africa/Lagos", "Asia/Kathmandu", "America/New_York", "Australia/Lord_Howe"]),
    st.integers(min_value=1, max_value=2**40),
)
def test_tick_fast_path_equals_rewrite_at_any_instant(moment: datetime, zone: str, seq: int) -> None:
    moment = moment - timedelta(microseconds=moment.microsecond % 1000)
    tick = TICK.model_copy(update={"ts": moment})
    plugin = TimezonePlugin()
    parts = parts_of(tick, seq)
    assert plugin.on_deliver_tick(parts, zone, LUNO) == plugin.on_deliver(parts.data, zone, LUNO)
