"""bridge.limits: per-user and global connection counts, leases, takeovers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from bridge.limits import ConnectionLimits, Lease, LimitRefusal, LocalConnectionLimits, subscribe_refusal

# --- table-driven sequences ----------------------------------------------------------------------


@dataclass(frozen=True)
class Acquire:
    """Acquire for ``user``; the lease (if any) is remembered as ``name``."""

    user: str
    name: str
    replacing: str | None = None  # a remembered lease name, or 'foreign:<user>'
    refused: str | None = None  # expected LimitRefusal.reason, None when it must succeed


@dataclass(frozen=True)
class Release:
    name: str


Step = Acquire | Release


def _run(limits: LocalConnectionLimits, steps: list[Step]) -> dict[str, Lease]:
    leases: dict[str, Lease] = {}
    other = LocalConnectionLimits(max_per_user=100, max_total=100)  # issues "foreign" leases

    def resolve(name: str) -> Lease:
        if name.startswith("foreign:"):
            foreign = other.acquire(name.removeprefix("foreign:"))
            assert isinstance(foreign, Lease)
            return foreign
        return leases[name]

    for step in steps:
        if isinstance(step, Release):
            limits.release(resolve(step.name))
            continue
        replacing = resolve(step.replacing) if step.replacing else None
        result = limits.acquire(step.user, replacing=replacing)
        if step.refused is None:
            assert isinstance(result, Lease), f"{step}: {result}"
            assert result.user == step.user
            assert all(result.id != lease.id for lease in leases.values()), "lease ids must be unique"
            leases[step.name] = result
        else:
            assert isinstance(result, LimitRefusal), f"{step}: {result}"
            assert result.reason == step.refused
            assert result.detail
    return leases


@pytest.mark.parametrize(
    ("max_per_user", "max_total", "steps", "expected"),
    [
        pytest.param(10, 100, [], {}, id="empty"),
        pytest.param(
            10,
            100,
            [Acquire("alice", "a1"), Acquire("alice", "a2"), Acquire("bob", "b1")],
            {"alice": 2, "bob": 1},
            id="counts-per-user",
        ),
        pytest.param(
            10,
            100,
            [Acquire("alice", "a1"), Acquire("alice", "a2"), Release("a1")],
            {"alice": 1},
            id="release",
        ),
        pytest.param(
            10,
            100,
            [Acquire("alice", "a1"), Release("a1"), Release("a1"), Release("a1")],
            {},
            id="release-is-idempotent",
        ),
        pytest.param(
            10,
            100,
            [Acquire("alice", "a1"), Acquire("alice", "a2"), Release("a1"), Release("a1")],
            {"alice": 1},
            id="double-release-does-not-eat-a-sibling",
        ),
        pytest.param(
            10,
            100,
            [*(Acquire("alice", f"a{i}") for i in range(10)), Acquire("alice", "a10", refused="user_limit")],
            {"alice": 10},
            id="eleventh-refused",
        ),
        pytest.param(
            10,
            100,
            [
                *(Acquire("alice", f"a{i}") for i in range(10)),
                Acquire("alice", "x", refused="user_limit"),
                Acquire("bob", "b1"),
                Release("a3"),
                Acquire("alice", "a10"),
                Acquire("alice", "y", refused="user_limit"),
            ],
            {"alice": 10, "bob": 1},
            id="limit-is-per-user-and-frees-on-release",
        ),
        pytest.param(
            10,
            3,
            [
                Acquire("alice", "a1"),
                Acquire("alice", "a2"),
                Acquire("bob", "b1"),
                Acquire("carol", "c1", refused="global_limit"),
                Release("a1"),
                Acquire("carol", "c1"),
            ],
            {"alice": 1, "bob": 1, "carol": 1},
            id="global-limit",
        ),
        pytest.param(
            1,
            1,
            [Acquire("alice", "a1"), Acquire("alice", "a2", refused="global_limit")],
            {"alice": 1},
            id="global-checked-before-per-user",
        ),
        pytest.param(
            1,
            100,
            [Acquire("alice", "a1"), Acquire("alice", "a2", replacing="a1")],
            {"alice": 1},
            id="takeover-at-user-limit",
        ),
        pytest.param(
            10,
            1,
            [Acquire("alice", "a1"), Acquire("alice", "a2", replacing="a1")],
            {"alice": 1},
            id="takeover-at-global-limit",
        ),
        pytest.param(
            1,
            100,
            [Acquire("alice", "a1"), Acquire("alice", "a2", replacing="a1"), Release("a1")],
            {"alice": 1},
            id="late-release-of-replaced-lease-is-a-no-op",
        ),
        pytest.param(
            1,
            100,
            [
                Acquire("alice", "a1"),
                Acquire("alice", "a2", replacing="a1"),
                Acquire("alice", "a3", replacing="a2"),
                Release("a1"),
                Release("a2"),
            ],
            {"alice": 1},
            id="chained-takeovers",
        ),
        pytest.param(
            1,
            100,
            [
                Acquire("alice", "a1"),
                Acquire("alice", "a2", replacing="a1"),
                Acquire("alice", "x", replacing="a1", refused="user_limit"),
            ],
            {"alice": 1},
            id="replaced-lease-cannot-be-reused",
        ),
        pytest.param(
            1,
            100,
            [Acquire("alice", "a1"), Release("a1"), Acquire("alice", "a2", replacing="a1")],
            {"alice": 1},
            id="takeover-with-released-lease-is-a-normal-acquire",
        ),
        pytest.param(
            1,
            100,
            [
                Acquire("alice", "a1"),
                Release("a1"),
                Acquire("alice", "a2"),
                Acquire("alice", "x", replacing="a1", refused="user_limit"),
            ],
            {"alice": 1},
            id="released-lease-gives-no-takeover-at-limit",
        ),
        pytest.param(
            10,
            100,
            [Acquire("bob", "b1"), Acquire("alice", "a1", replacing="b1")],
            {"alice": 1, "bob": 1},
            id="takeover-with-another-users-lease-is-a-normal-acquire",
        ),
        pytest.param(
            1,
            100,
            [
                Acquire("alice", "a1"),
                Acquire("bob", "b1"),
                Acquire("alice", "x", replacing="b1", refused="user_limit"),
            ],
            {"alice": 1, "bob": 1},
            id="another-users-lease-gives-no-takeover-at-limit",
        ),
        pytest.param(
            10,
            100,
            [Acquire("alice", "a1"), Acquire("alice", "a2", replacing="foreign:alice")],
            {"alice": 2},
            id="takeover-with-another-limiters-lease-is-a-normal-acquire",
        ),
        pytest.param(
            10,
            100,
            [Acquire("alice", "a1"), Release("foreign:alice")],
            {"alice": 1},
            id="release-of-another-limiters-lease-is-a-no-op",
        ),
        pytest.param(
            0,
            100,
            [Acquire("alice", "a1", refused="user_limit")],
            {},
            id="zero-per-user",
        ),
        pytest.param(
            10,
            0,
            [Acquire("alice", "a1", refused="global_limit")],
            {},
            id="zero-total",
        ),
    ],
)
def test_sequences(max_per_user: int, max_total: int, steps: list[Step], expected: dict[str, int]) -> None:
    limits = LocalConnectionLimits(max_per_user=max_per_user, max_total=max_total)
    _run(limits, steps)
    assert limits.per_user() == expected
    assert limits.total == sum(expected.values())
    for user in ("alice", "bob", "carol", "nobody"):
        assert limits.count(user) == expected.get(user, 0)


# --- single behaviours ---------------------------------------------------------------------------


def test_conforms_to_protocol() -> None:
    limits: ConnectionLimits = LocalConnectionLimits(max_per_user=1, max_total=1)  # checked by mypy
    assert limits.total == 0


def test_forged_lease_is_ignored() -> None:
    limits = LocalConnectionLimits(max_per_user=10, max_total=10)
    lease = limits.acquire("alice")
    assert isinstance(lease, Lease)
    limits.release(Lease(id=lease.id, user="bob"))  # right id, wrong user
    limits.release(Lease(id="nonsense", user="alice"))
    assert limits.per_user() == {"alice": 1}


def test_released_users_leave_the_map() -> None:
    limits = LocalConnectionLimits(max_per_user=10, max_total=1000)
    leases = [limits.acquire(f"user-{i}") for i in range(100)]
    for lease in leases:
        assert isinstance(lease, Lease)
        limits.release(lease)
    assert limits.per_user() == {}
    assert limits.total == 0


def test_per_user_is_a_snapshot() -> None:
    limits = LocalConnectionLimits(max_per_user=10, max_total=10)
    limits.acquire("alice")
    snapshot = limits.per_user()
    snapshot["alice"] = 99
    snapshot["mallory"] = 1
    limits.acquire("bob")
    assert limits.per_user() == {"alice": 1, "bob": 1}
    assert snapshot == {"alice": 99, "mallory": 1}


def test_refusal_details() -> None:
    limits = LocalConnectionLimits(max_per_user=1, max_total=2)
    limits.acquire("alice")
    assert limits.acquire("alice") == LimitRefusal("user_limit", "user 'alice' has 1 of 1 connections")
    limits.acquire("bob")
    assert limits.acquire("carol") == LimitRefusal("global_limit", "broker has 2 of 2 connections")


@pytest.mark.parametrize(("max_per_user", "max_total"), [(-1, 10), (10, -1)])
def test_negative_limits_are_rejected(max_per_user: int, max_total: int) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        LocalConnectionLimits(max_per_user=max_per_user, max_total=max_total)


# --- random sequences against a model ------------------------------------------------------------

_USERS = ("alice", "bob", "carol")


class LimitsMachine(RuleBasedStateMachine):
    """Random acquire / takeover / release sequences, checked against a naive model."""

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.limits = LocalConnectionLimits(max_per_user=0, max_total=0)
        self.other = LocalConnectionLimits(max_per_user=100, max_total=100)
        self.live: set[Lease] = set()  # the model: leases that should count

    @initialize(max_per_user=st.integers(0, 3), max_total=st.integers(0, 5))
    def setup(self, max_per_user: int, max_total: int) -> None:
        self.limits = LocalConnectionLimits(max_per_user=max_per_user, max_total=max_total)

    def _transfers(self, user: str, replacing: Lease | None) -> bool:
        return replacing is not None and replacing.user == user and replacing in self.live

    def _expected(self, user: str, replacing: Lease | None) -> str | None:
        """The model's answer: None for a grant, else the refusal reason."""
        if self._transfers(user, replacing):
            return None
        if len(self.live) >= self.limits.max_total:
            return "global_limit"
        if sum(lease.user == user for lease in self.live) >= self.limits.max_per_user:
            return "user_limit"
        return None

    def _acquire(self, user: str, replacing: Lease | None) -> Lease | None:
        expected = self._expected(user, replacing)
        transfers = self._transfers(user, replacing)
        result = self.limits.acquire(user, replacing=replacing)
        if expected is not None:
            assert isinstance(result, LimitRefusal)
            assert result.reason == expected
            return None
        assert isinstance(result, Lease)
        assert result.user == user
        assert result not in self.live
        if transfers:
            assert replacing is not None
            self.live.discard(replacing)
        self.live.add(result)
        return result

    @rule(target=leases, user=st.sampled_from(_USERS))
    def acquire(self, user: str) -> Lease | None:
        return self._acquire(user, None)

    @rule(target=leases, user=st.sampled_from(_USERS), replacing=leases)
    def takeover(self, user: str, replacing: Lease | None) -> Lease | None:
        return self._acquire(user, replacing)

    @rule(target=leases, user=st.sampled_from(_USERS))
    def takeover_foreign(self, user: str) -> Lease | None:
        foreign = self.other.acquire(user)
        assert isinstance(foreign, Lease)
        return self._acquire(user, foreign)

    @rule(lease=leases)
    def release(self, lease: Lease | None) -> None:
        if lease is not None:
            self.limits.release(lease)
            self.live.discard(lease)

    @invariant()
    def counts_agree(self) -> None:
        per_user = self.limits.per_user()
        assert per_user == dict(Counter(lease.user for lease in self.live))
        assert self.limits.total == sum(per_user.values()) == len(self.live)
        assert self.limits.total <= self.limits.max_total
        assert all(1 <= count <= self.limits.max_per_user for count in per_user.values())
        for user in _USERS:
            assert self.limits.count(user) == per_user.get(user, 0)


LimitsMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestLimitsMachine = LimitsMachine.TestCase


# --- subscription caps ---------------------------------------------------------------------------

HELD = frozenset({"market/luno/+", "market/valr/BTC-ZAR"})


@pytest.mark.parametrize(
    ("topic_filter", "held", "max_filters", "max_topic_bytes", "expected"),
    [
        ("market/#", frozenset(), 1, 32, None),
        ("market/#", HELD, 3, 256, None),  # the last free slot
        ("market/#", HELD, 2, 256, "too_many_filters"),
        ("market/luno/+", HELD, 2, 256, None),  # held already: a replacement, not an addition
        ("market/luno/+", HELD, 1, 256, None),  # ... even when the cap was lowered below holdings
        ("market/#", HELD, 1, 256, "too_many_filters"),
        ("a" * 32, frozenset(), 1, 32, None),  # exactly the limit
        ("a" * 33, frozenset(), 1, 32, "filter_too_long"),
        ("€" * 10, frozenset(), 1, 32, None),  # 30 bytes
        ("€" * 11, frozenset(), 1, 32, "filter_too_long"),  # 11 characters, but 33 UTF-8 bytes
        ("a/" + "😀" * 7 + "/b", frozenset(), 1, 32, None),  # 32 bytes in 11 characters
        ("a/" + "😀" * 7 + "/bc", frozenset(), 1, 32, "filter_too_long"),
        ("a" * 33, frozenset({"a" * 33}), 10, 32, "filter_too_long"),  # held, but too long now
        ("a" * 33, HELD, 2, 32, "filter_too_long"),  # too long is the reason given first
    ],
)
def test_subscribe_refusal(
    topic_filter: str, held: frozenset[str], max_filters: int, max_topic_bytes: int, expected: str | None
) -> None:
    refusal = subscribe_refusal(topic_filter, held, max_filters=max_filters, max_topic_bytes=max_topic_bytes)
    assert refusal == expected


@pytest.mark.parametrize(
    ("held", "packet", "expected"),
    [
        # 8 new filters against a cap of 5: the first 5 in packet order, then refusals.
        (set(), [f"m/{i}" for i in range(8)], [None] * 5 + ["too_many_filters"] * 3),
        # A filter repeated within one packet takes one slot (the second replaces the first).
        (set(), ["m/a", "m/a", "m/b", "m/c", "m/d", "m/e", "m/f"], [None] * 6 + ["too_many_filters"]),
        # A full session may still re-subscribe what it holds, in any mix.
        ({f"m/{i}" for i in range(5)}, ["m/9", "m/0", "m/4"], ["too_many_filters", None, None]),
        # Too long refusals take no slot.
        (
            {"m/0"},
            ["x" * 300, "m/1", "m/2", "m/3", "m/4", "m/5"],
            ["filter_too_long"] + [None] * 4 + ["too_many_filters"],
        ),
    ],
)
def test_subscribe_refusals_over_one_packet(
    held: set[str], packet: list[str], expected: list[str | None]
) -> None:
    """What the broker does: each filter checked against the holdings as granted so far."""
    got = []
    for topic_filter in packet:
        refusal = subscribe_refusal(topic_filter, held, max_filters=5, max_topic_bytes=256)
        if refusal is None:
            held.add(topic_filter)
        got.append(refusal)
    assert got == expected
    assert len(held) <= 5
