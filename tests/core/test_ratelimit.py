"""bridge.core.ratelimit: the publish token bucket, the per-topic gate and the outbox it drives,
and which limits a connection gets from the config and its token.

Times and rates are binary fractions (0.125, 0.25, 4/s...) so exact boundaries are exact.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.auth import Claims, Role
from bridge.config import RateLimitConfig, TopicRatesConfig
from bridge.core.ratelimit import (
    MAX_RATE,
    MIN_RATE,
    PublishBucket,
    TopicGate,
    publisher_bucket,
    subscriber_gate,
    subscriber_rate,
    valid_rate,
)

# --- valid_rate ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1.0),
        (2.5, 2.5),
        (MIN_RATE, MIN_RATE),
        (MAX_RATE, MAX_RATE),
        (int(MAX_RATE), MAX_RATE),
        (0, None),
        (0.0, None),
        (-1, None),
        (MIN_RATE / 2, None),
        (MAX_RATE * 2, None),
        (math.nan, None),
        (math.inf, None),
        (-math.inf, None),
        (10**400, None),  # beyond float range: OverflowError inside, None outside
        (True, None),
        (False, None),
        ("5", None),
        (None, None),
        ([5], None),
    ],
)
def test_valid_rate(value: object, expected: float | None) -> None:
    assert valid_rate(value) == expected


# --- PublishBucket -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst", "steps"),
    [
        pytest.param(1, 3, [(0, True), (0, True), (0, True), (0, False)], id="burst-then-refused"),
        pytest.param(1, 1, [(-1e9, True), (-1e9, False)], id="first-admit-at-any-clock-origin"),
        pytest.param(1, 2, [(7, True), (7, True), (7, False), (7, False)], id="equal-times-refill-nothing"),
        pytest.param(
            2, 1, [(0, True), (0.25, False), (0.5, True), (0.5, False)], id="refill-at-exact-boundary"
        ),
        pytest.param(
            4, 1, [(0, True), (0.125, False), (0.25, True)], id="refused-admits-keep-partial-tokens"
        ),
        pytest.param(
            1,
            2,
            [(0, True), (0, True), (100, True), (100, True), (100, False)],
            id="refill-capped-at-burst",
        ),
        pytest.param(0.5, 1, [(0, True), (1, False), (2, True)], id="below-one-per-second"),
        pytest.param(
            1,
            1,
            [(10, True), (5, False), (10.5, False), (11, True)],
            id="clock-backwards-refills-nothing",
        ),
        pytest.param(
            1,
            1,
            [(10, True), (-100, False), (-100, False), (11, True), (11, False)],
            id="clock-far-backwards-costs-no-extra-wait",
        ),
        pytest.param(1, 2, [(10, True), (9, True), (9, False)], id="clock-backwards-keeps-tokens"),
        pytest.param(
            8,
            4,
            [*((0, True) for _ in range(4)), (0.125, True), (0.125, False), (0.5, True), (0.5, True)],
            id="steady-rate-after-burst",
        ),
    ],
)
def test_bucket(rate: float, burst: int, steps: list[tuple[float, bool]]) -> None:
    bucket = PublishBucket(rate, burst)
    assert [bucket.admit(now) for now, _ in steps] == [admitted for _, admitted in steps]


@pytest.mark.parametrize(
    ("rate", "burst", "fragment"),
    [
        (0, 1, "rate_per_s"),
        (-1, 1, "rate_per_s"),
        (math.nan, 1, "rate_per_s"),
        (math.inf, 1, "rate_per_s"),
        (MAX_RATE * 2, 1, "rate_per_s"),
        (MIN_RATE / 2, 1, "rate_per_s"),
        (1, 0, "burst"),
        (1, -1, "burst"),
        (1, 1.5, "burst"),
        (1, True, "burst"),
        (1, 10**7, "burst"),
    ],
)
def test_bucket_rejects_bad_arguments(rate: float, burst: int, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        PublishBucket(rate, burst)


_TIMES = st.lists(st.integers(-64, 640).map(lambda k: k / 16), max_size=60)


@settings(max_examples=300, deadline=None)
@given(rate=st.sampled_from([0.5, 1.0, 4.0, 16.0]), burst=st.integers(1, 6), times=_TIMES)
def test_bucket_never_admits_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, times: list[float]
) -> None:
    bucket = PublishBucket(rate, burst)
    admitted: list[float] = []
    clock = -math.inf
    for now in times:
        clock = max(clock, now)  # the bucket's own view: time never runs backwards
        if bucket.admit(now):
            admitted.append(clock)
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= burst + rate * (admitted[j] - start)


@settings(max_examples=200, deadline=None)
@given(rate=st.sampled_from([0.5, 1.0, 4.0, 16.0]), burst=st.integers(1, 6), gaps=st.lists(st.integers(0, 8)))
def test_bucket_admits_everything_spaced_one_interval_apart(rate: float, burst: int, gaps: list[int]) -> None:
    bucket = PublishBucket(rate, burst)
    now = 0.0
    assert bucket.admit(now)
    for extra in gaps:
        now += (1 + extra) / rate
        assert bucket.admit(now)


# --- TopicGate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admit:
    topic: str
    at: float
    sent: bool


@dataclass(frozen=True)
class Release:
    at: float
    topics: list[str]


@dataclass(frozen=True)
class Due:
    at: float | None


GateStep = Admit | Release | Due


@pytest.mark.parametrize(
    ("rate", "flushes", "steps"),
    [
        pytest.param(4, 4, [Due(None), Admit("a", 0, True), Due(None)], id="first-message-goes"),
        pytest.param(
            4, 4, [Admit("a", 0, True), Admit("a", 0, False), Due(0.25)], id="equal-times-second-held"
        ),
        pytest.param(
            4,
            4,
            [Admit("a", 0, True), Admit("a", 0.125, False), Admit("a", 0.25, True), Due(None)],
            id="due-at-exact-boundary",
        ),
        pytest.param(
            4,
            4,
            [Admit("a", 0, True), Admit("b", 0, True), Admit("a", 0.1, False), Admit("b", 0.1, False)],
            id="topics-are-independent",
        ),
        pytest.param(
            4,
            4,
            [Admit("a", 0, True), Admit("a", 0.1, False), Admit("a", 0.2, False), Due(0.25)],
            id="holding-again-keeps-the-due-time",
        ),
        pytest.param(
            2,
            4,
            [
                Admit("a", 0, True),
                Admit("b", 0.25, True),
                Admit("b", 0.3, False),
                Admit("a", 0.4, False),
                Due(0.5),  # a: held later, due first
                Release(0.4, []),
                Release(0.5, ["a"]),
                Due(0.75),
                Release(0.75, ["b"]),
                Due(None),
            ],
            id="released-in-due-order",
        ),
        pytest.param(
            2,
            4,
            [
                Admit("a", 0, True),
                Admit("b", 0.25, True),
                Admit("b", 0.3, False),
                Admit("a", 0.4, False),
                Release(2, ["a", "b"]),
                Due(None),
            ],
            id="late-release-gives-all-due",
        ),
        pytest.param(
            2,
            4,
            [
                Admit("a", 0, True),
                Admit("a", 0.25, False),
                Release(0.75, ["a"]),
                Admit("a", 1, False),  # the release counts as a send at 0.75
                Due(1.25),
                Admit("a", 1.25, True),
            ],
            id="release-counts-as-sent-at-release-time",
        ),
        pytest.param(
            2,
            4,
            [
                Admit("a", 0, True),
                Admit("a", 0.25, False),
                Admit("a", 0.6, True),  # the timer is late: this one goes, the held one is dropped
                Due(None),
                Release(1, []),
            ],
            id="late-timer-newer-message-goes",
        ),
        pytest.param(
            1,
            2,
            [
                Admit("a", 0, True),
                Admit("b", 0.125, True),
                Admit("c", 0.25, True),
                Admit("a", 0.5, False),
                Admit("b", 0.5, False),
                Admit("c", 0.5, False),
                Due(1),
                Release(1, ["a"]),
                Due(1.5),  # b and c are due at 1.125 and 1.25, batched half an interval later
                Release(1.5, ["b", "c"]),
                Due(None),
            ],
            id="wakeups-batched",
        ),
        pytest.param(
            1,
            2,
            [Admit("a", 0, True), Admit("a", 0.5, False), Due(1), Release(1, ["a"]), Due(None)],
            id="first-hold-is-due-exactly",
        ),
        pytest.param(
            4,
            4,
            [
                Admit("a", 10, True),
                Admit("a", 5, False),  # read as 10
                Due(10.25),
                Admit("b", 5, True),  # recorded at 10
                Admit("b", 10.125, False),
                Release(3, []),
                Release(10.25, ["a", "b"]),
            ],
            id="clock-backwards-counts-as-latest",
        ),
        pytest.param(
            MIN_RATE, 4, [Admit("a", 0, True), Admit("a", 999, False), Due(1000)], id="slowest-rate"
        ),
    ],
)
def test_gate(rate: float, flushes: int, steps: list[GateStep]) -> None:
    gate = TopicGate(rate, flushes_per_interval=flushes)
    for index, step in enumerate(steps):
        where = f"step {index}: {step}"
        if isinstance(step, Admit):
            assert gate.admit(step.topic, step.at) is step.sent, where
        elif isinstance(step, Release):
            assert gate.release(step.at) == step.topics, where
        else:
            assert gate.next_due() == step.at, where


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_per_s": 0}, "max_per_s"),
        ({"max_per_s": -4}, "max_per_s"),
        ({"max_per_s": math.nan}, "max_per_s"),
        ({"max_per_s": math.inf}, "max_per_s"),
        ({"max_per_s": 5e-324}, "max_per_s"),  # 1/rate would overflow
        ({"max_per_s": 1, "max_topics": 0}, "max_topics"),
        ({"max_per_s": 1, "flushes_per_interval": 0}, "flushes_per_interval"),
    ],
)
def test_gate_rejects_bad_arguments(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        TopicGate(**kwargs)


def test_gate_forgets_idle_topics_when_full() -> None:
    gate = TopicGate(1, max_topics=3)
    assert all(gate.admit(topic, 0) for topic in "abc")
    # Full of topics sent within the interval: a new one goes ungated and is not remembered.
    assert gate.admit("d", 0.5)
    assert gate.admit("d", 0.6)
    assert gate.tracked == 3
    assert not gate.admit("a", 0.7)  # the remembered ones are still gated
    # An interval later a, b and c gate nothing any more: the sweep makes room.
    assert gate.admit("e", 1.5)
    assert gate.tracked == 2  # a is held, so kept; b and c are gone
    assert not gate.admit("e", 1.6)
    assert gate.release(2) == ["a"]


def test_gate_sweeps_at_most_once_per_interval() -> None:
    gate = TopicGate(1, max_topics=2)
    assert gate.admit("a", 0)
    assert gate.admit("b", 0)
    assert gate.admit("c", 0.5)  # sweep at 0.5: nothing is old enough, c goes ungated
    assert gate.admit("x", 1.2)  # a and b are idle now, but the next sweep is at 1.5
    assert gate.tracked == 2
    assert gate.admit("y", 1.5)
    assert gate.tracked == 1


def test_gate_memory_follows_live_topics() -> None:
    """Ten thousand one-off topics, a few at a time: the table never outgrows max_topics."""
    gate = TopicGate(4, max_topics=100)
    for index in range(10_000):
        assert gate.admit(f"market/x/{index}", index / 64)
        assert gate.tracked <= 100
    assert gate.held == 0


def test_gate_heap_stays_proportional_to_held_topics() -> None:
    """A caller that never calls release (timers late) leaves stale entries: they are compacted."""
    gate = TopicGate(4)
    for step in range(1000):
        now = step * 0.25
        assert gate.admit("a", now)  # due again each time: a late timer
        assert not gate.admit("a", now + 0.125)  # held anew
    assert gate.held == 1
    assert len(gate._heap) <= 2 * gate.held + 17


def test_many_topics_held_and_released_together() -> None:
    gate = TopicGate(2)
    topics = [f"market/luno/P{i}" for i in range(500)]
    assert all(gate.admit(topic, 0) for topic in topics)
    assert not any(gate.admit(topic, 0.25) for topic in topics)
    assert gate.held == 500
    assert gate.next_due() == 0.5
    assert sorted(gate.release(0.5)) == sorted(topics)
    assert gate.next_due() is None


_RATES = st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0])
_ANY_TIMES = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    rate=_RATES,
    flushes=st.integers(1, 8),
    events=st.lists(
        st.tuples(st.sampled_from("abc"), _ANY_TIMES) | st.tuples(st.none(), _ANY_TIMES), max_size=80
    ),
)
def test_gate_sends_of_a_topic_are_an_interval_apart(
    rate: float, flushes: int, events: list[tuple[str | None, float]]
) -> None:
    """Any times, any order, releases at any moment: per topic, sends are >= 1/rate apart."""
    gate = TopicGate(rate, flushes_per_interval=flushes)
    sends: dict[str, list[float]] = {}
    clock = -math.inf
    for topic, now in events:
        clock = max(clock, now)
        if topic is None:
            for released in gate.release(now):
                sends.setdefault(released, []).append(clock)
        elif gate.admit(topic, now):
            sends.setdefault(topic, []).append(clock)
    for times in sends.values():
        for earlier, later in itertools.pairwise(times):
            assert later >= earlier + gate.interval


# --- the outbox the gate is designed for ---------------------------------------------------------


@dataclass
class FakeOutbox:
    """The caller from the module docstring, on a fake loop: one timer, fired exactly on time."""

    gate: TopicGate
    pending: dict[str, bytes] = field(default_factory=dict)
    written: list[tuple[float, bytes]] = field(default_factory=list)
    conflated: int = 0
    timer: float | None = None
    wakeups: int = 0

    def _arm(self, due: float | None) -> None:
        if due is not None and (self.timer is None or due < self.timer):
            self.timer = due

    def send(self, topic: str, data: bytes, now: float) -> None:
        self.advance(now)
        if self.gate.admit(topic, now):
            if self.pending.pop(topic, None) is not None:
                self.conflated += 1
            self.written.append((now, data))
            return
        if topic in self.pending:
            self.conflated += 1
        self.pending[topic] = data
        self._arm(self.gate.next_due())

    def advance(self, now: float) -> None:
        while self.timer is not None and self.timer <= now:
            when, self.timer = self.timer, None
            self.wakeups += 1
            for topic in self.gate.release(when):
                if (data := self.pending.pop(topic, None)) is not None:
                    self.written.append((when, data))
            self._arm(self.gate.next_due())


@dataclass(frozen=True)
class Send:
    topic: str
    data: str
    at: float


@pytest.mark.parametrize(
    ("rate", "sends", "until", "written", "conflated"),
    [
        pytest.param(
            2,
            [Send("a", "a1", 0), Send("a", "a2", 0.125), Send("a", "a3", 0.25), Send("a", "a4", 0.625)],
            2,
            [(0, "a1"), (0.5, "a3"), (1.0, "a4")],
            1,
            id="latest-held-message-goes-when-due",
        ),
        pytest.param(
            2,
            [Send("a", "a1", 0), Send("b", "b1", 0), Send("a", "a2", 0.25), Send("b", "b2", 0.375)],
            2,
            [(0, "a1"), (0, "b1"), (0.5, "a2"), (0.5, "b2")],
            0,
            id="one-wakeup-for-two-topics",
        ),
        pytest.param(
            2,
            [Send("a", "a1", 0), Send("a", "a2", 0.25), Send("a", "a3", 1)],
            2,
            [(0, "a1"), (0.5, "a2"), (1, "a3")],
            0,
            id="after-a-release-the-next-on-time-message-goes-at-once",
        ),
        pytest.param(
            4,
            [Send("a", f"a{i}", i / 64) for i in range(64)],
            2,
            [(i / 4, f"a{max(0, 16 * i - 1)}") for i in range(4)] + [(1.0, "a63")],
            59,
            id="fast-topic-conflated-to-the-rate",
        ),
        pytest.param(
            1,
            [Send("a", "a1", 0), Send("a", "a2", 0.5)],
            0.75,
            [(0, "a1")],
            0,
            id="held-until-due",
        ),
    ],
)
def test_outbox_sequences(
    rate: float, sends: list[Send], until: float, written: list[tuple[float, str]], conflated: int
) -> None:
    outbox = FakeOutbox(TopicGate(rate))
    for send in sends:
        outbox.send(send.topic, send.data.encode(), send.at)
    outbox.advance(until)
    assert [(at, data.decode()) for at, data in outbox.written] == written
    assert outbox.conflated == conflated


@settings(max_examples=300, deadline=None)
@given(
    rate=_RATES,
    flushes=st.integers(1, 8),
    sends=st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 12)), max_size=80),
)
def test_outbox_delivers_the_latest_of_every_topic_in_time(
    rate: float, flushes: int, sends: list[tuple[str, int]]
) -> None:
    """Nothing is lost but superseded messages; the newest always arrives, at most
    interval + interval/flushes after it was sent; sends per topic stay an interval apart."""
    gate = TopicGate(rate, flushes_per_interval=flushes)
    outbox = FakeOutbox(gate)
    now = 0.0
    sent_at: dict[bytes, float] = {}
    latest: dict[str, bytes] = {}
    for index, (topic, gap) in enumerate(sends):
        now += gap / 16
        data = f"{topic}{index}".encode()
        sent_at[data] = now
        latest[topic] = data
        outbox.send(topic, data, now)
    outbox.advance(math.inf)

    assert outbox.pending == {}
    assert gate.held == 0
    assert len(outbox.written) + outbox.conflated == len(sends)
    by_topic: dict[str, list[tuple[float, bytes]]] = {}
    for at, data in outbox.written:
        by_topic.setdefault(chr(data[0]), []).append((at, data))
        assert at - sent_at[data] <= gate.interval + gate.interval / flushes + 1e-9
    for topic, data in latest.items():
        assert by_topic[topic][-1][1] == data
    for deliveries in by_topic.values():
        for (earlier, _), (later, _) in itertools.pairwise(deliveries):
            assert later >= earlier + gate.interval
    # Batched wakeups: never more than `flushes` per interval over the run.
    if outbox.written:
        span = outbox.written[-1][0] - outbox.written[0][0]
        assert outbox.wakeups <= flushes * (span / gate.interval + 1)


# --- limits for a connection: config and claims --------------------------------------------------

PER_ROLE = RateLimitConfig(topic_updates_per_s=TopicRatesConfig(subscriber=2, feed=3, service=0, admin=0.5))


def _claims(role: Role = "subscriber", rate: float | None = None) -> Claims:
    return Claims(sub="alice", role=role, rate=rate, exp=0.0)


def _unchecked(**fields: Any) -> Claims:
    """Claims that skipped validation, as a future code path might build them."""
    return Claims(sub="alice", exp=0.0, **fields)


@pytest.mark.parametrize(
    ("claims", "cfg", "expected"),
    [
        pytest.param(None, RateLimitConfig(), None, id="defaults-full-rate-without-claims"),
        pytest.param(_claims(), RateLimitConfig(), None, id="defaults-full-rate"),
        pytest.param(_claims("admin"), RateLimitConfig(), None, id="defaults-full-rate-admin"),
        pytest.param(None, PER_ROLE, 2.0, id="no-claims-gets-the-subscriber-rate"),
        pytest.param(_claims("subscriber"), PER_ROLE, 2.0, id="subscriber-role"),
        pytest.param(_claims("feed"), PER_ROLE, 3.0, id="feed-role"),
        pytest.param(_claims("service"), PER_ROLE, None, id="zero-is-full-rate"),
        pytest.param(_claims("admin"), PER_ROLE, 0.5, id="admin-role"),
        pytest.param(_claims(rate=10), PER_ROLE, 10.0, id="claim-raises-the-role-rate"),
        pytest.param(_claims(rate=0.25), PER_ROLE, 0.25, id="claim-lowers-the-role-rate"),
        pytest.param(_claims("service", rate=1), PER_ROLE, 1.0, id="claim-limits-an-unlimited-role"),
        pytest.param(_claims(rate=MAX_RATE), RateLimitConfig(), MAX_RATE, id="claim-at-max"),
        pytest.param(_unchecked(rate=math.nan), PER_ROLE, 2.0, id="unchecked-nan-claim-ignored"),
        pytest.param(_unchecked(rate=math.inf), PER_ROLE, 2.0, id="unchecked-inf-claim-ignored"),
        pytest.param(_unchecked(rate=0), PER_ROLE, 2.0, id="unchecked-zero-claim-ignored"),
        pytest.param(_unchecked(rate=-3), PER_ROLE, 2.0, id="unchecked-negative-claim-ignored"),
        pytest.param(_unchecked(rate=True), PER_ROLE, 2.0, id="unchecked-bool-claim-ignored"),
        pytest.param(_unchecked(rate="5"), PER_ROLE, 2.0, id="unchecked-string-claim-ignored"),
        pytest.param(
            _unchecked(role="feed", rate=-1), PER_ROLE, 3.0, id="unchecked-bad-claim-falls-back-to-own-role"
        ),
        pytest.param(_unchecked(role="root"), PER_ROLE, 2.0, id="unknown-role-gets-the-subscriber-rate"),
    ],
)
def test_subscriber_rate(claims: Claims | None, cfg: RateLimitConfig, expected: float | None) -> None:
    assert subscriber_rate(claims, cfg) == expected
    gate = subscriber_gate(claims, cfg)
    if expected is None:
        assert gate is None
    else:
        assert gate is not None
        assert gate.max_per_s == expected


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        pytest.param(RateLimitConfig(), (1000.0, 1000), id="default"),
        pytest.param(RateLimitConfig(publish_per_s=0), None, id="zero-is-unlimited"),
        pytest.param(RateLimitConfig(publish_per_s=0, publish_burst=5), None, id="zero-ignores-the-burst"),
        pytest.param(RateLimitConfig(publish_per_s=2.5, publish_burst=7), (2.5, 7), id="configured"),
        pytest.param(RateLimitConfig(publish_per_s=MIN_RATE, publish_burst=1), (MIN_RATE, 1), id="slowest"),
    ],
)
def test_publisher_bucket(cfg: RateLimitConfig, expected: tuple[float, int] | None) -> None:
    bucket = publisher_bucket(cfg)
    if expected is None:
        assert bucket is None
    else:
        assert bucket is not None
        assert (bucket.rate_per_s, bucket.burst) == expected


def test_default_publish_limit_passes_a_poll_burst_and_a_few_hundred_per_second() -> None:
    """The default never touches a real feed: 500 ticks at once, then 300/s for a minute."""
    bucket = publisher_bucket(RateLimitConfig())
    assert bucket is not None
    assert all(bucket.admit(0.0) for _ in range(500))
    assert all(bucket.admit(1 + i / 300) for i in range(300 * 60))


def test_default_publish_limit_holds_a_flood_to_the_rate() -> None:
    bucket = publisher_bucket(RateLimitConfig())
    assert bucket is not None
    admitted = sum(bucket.admit(i / 100_000) for i in range(1_000_000))  # 100,000/s for 10 s
    assert admitted <= 1000 + 1000 * 10
