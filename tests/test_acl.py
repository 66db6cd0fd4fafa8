"""bridge.acl: filter coverage (MQTT 3.1.1 semantics), per-session ACLs and role defaults."""

from __future__ import annotations

import itertools
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.acl import ALLOW_ALL, Acl, acl_for, filter_covers, will_refusal
from bridge.auth import ROLES, Claims, Role
from bridge.core.topics import is_valid_filter, matches

# --- filter_covers: table -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "requested", "covered"),
    [
        # the examples from the design
        ("market/#", "market/luno/+", True),
        ("market/#", "market/#", True),
        ("market/#", "#", False),
        ("market/+/BTC-ZAR", "market/luno/BTC-ZAR", True),
        ("market/+/BTC-ZAR", "market/#", False),
        ("user/alice/#", "user/+/#", False),
        ("+/+", "a/#", False),
        ("a/#", "a", True),  # '#' includes the parent level
        # exact
        ("a", "a", True),
        ("a/b/c", "a/b/c", True),
        ("a/b", "a/c", False),
        ("a", "A", False),  # case-sensitive
        ("a/b", "a", False),
        ("a", "a/b", False),
        # '+'
        ("+", "a", True),
        ("+", "+", True),
        ("a", "+", False),
        ("+", "a/b", False),
        ("+", "#", False),
        ("+/b", "a/b", True),
        ("+/+", "+/+", True),
        ("+/+", "a/+", True),
        ("a/+", "+/+", False),
        ("+/+", "a", False),
        ("a/+", "a/+/c", False),
        # '#'
        ("#", "a", True),
        ("#", "a/b/c", True),
        ("#", "+", True),
        ("#", "+/#", True),
        ("#", "#", True),
        ("#", "/", True),
        ("a/#", "a/#", True),
        ("a/#", "a/b/#", True),
        ("a/#", "a/+", True),
        ("a/#", "b/#", False),
        ("a/#", "#", False),
        ("a/b/#", "a/#", False),  # 'a/#' also matches 'a' and 'a/c'
        ("a/+/#", "a/#", False),  # 'a/#' matches 'a', which 'a/+/#' does not
        ("a/+/#", "a/b", True),
        ("a/+/#", "a/b/c/d", True),
        ("+/#", "#", True),  # no topic has zero levels, so both mean "any non-'$' topic"
        ("+/#", "a", True),
        ("+/#", "+/+/#", True),
        ("+/+/#", "#", False),
        ("+/+/#", "+/#", False),
        # empty levels are ordinary levels
        ("/", "/", True),
        ("+/+", "/", True),
        ("+", "/", False),
        ("/#", "/", True),
        ("/#", "/a/b", True),
        ("/#", "#", False),
        ("/+/#", "/#", True),  # the parent of '/#' is '', which is not a valid topic
        ("/+/#", "/", True),  # "+" takes the empty second level, "#" the parent
        ("+/#", "/#", True),
        ("a//b", "a//b", True),
        ("a/+/b", "a//b", True),
        ("a//b", "a/+/b", False),
        ("a/", "a", False),
        ("a/#", "a/", True),
        # '$' topics: never matched by a wildcard at level 0
        ("#", "$SYS/#", False),
        ("#", "$SYS/broker/uptime", False),
        ("+/#", "$SYS/uptime", False),
        ("+/uptime", "$SYS/uptime", False),
        ("$SYS/#", "$SYS/#", True),
        ("$SYS/#", "$SYS/broker/+", True),
        ("$SYS/+", "$SYS/uptime", True),
        ("$SYS/#", "#", False),
        ("$SYS/#", "+/#", False),
        ("#", "a/$SYS", True),  # '$' only matters at level 0
        ("a/+", "a/$x", True),
        # invalid filters on either side: never covered
        ("", "a", False),
        ("a", "", False),
        ("#", "a/#/b", False),
        ("#", "a+", False),
        ("a#", "a#", False),
        ("#", "a\x00", False),
    ],
)
def test_filter_covers(allowed: str, requested: str, covered: bool) -> None:
    assert filter_covers(allowed, requested) is covered


# --- filter_covers: properties -------------------------------------------------------------------

# Filter levels and topic levels come from a tiny alphabet so that random topics actually hit
# random filters. 'z' and '$z' never appear in filters: they stand for "any other string", which
# is what lets a '+' be told apart from a literal.
_FILTER_LEVELS = ["a", "b", "", "$s", "+", "#"]
_TOPIC_LEVELS = ["a", "b", "", "$s", "z", "$z"]
_MAX_FILTER_LEVELS = 3

filters = (
    st.lists(st.sampled_from(_FILTER_LEVELS), min_size=1, max_size=_MAX_FILTER_LEVELS)
    .map("/".join)
    .filter(is_valid_filter)
)
topics = (
    st.lists(st.sampled_from(_TOPIC_LEVELS), min_size=1, max_size=_MAX_FILTER_LEVELS + 1)
    .map("/".join)
    .filter(bool)
)

# Every topic of up to one level more than the longest filter: enough to witness any difference.
_UNIVERSE = [
    "/".join(levels)
    for size in range(1, _MAX_FILTER_LEVELS + 2)
    for levels in itertools.product(_TOPIC_LEVELS, repeat=size)
    if "/".join(levels)
]


@settings(max_examples=500)
@given(allowed=filters, requested=filters, topic=topics)
def test_covers_is_sound(allowed: str, requested: str, topic: str) -> None:
    """If ``allowed`` covers ``requested``, nothing ``requested`` matches escapes ``allowed``."""
    if filter_covers(allowed, requested) and matches(topic, requested):
        assert matches(topic, allowed)


def test_covers_is_exact() -> None:
    """Exhaustive over the small alphabet: ``filter_covers`` says yes exactly when the topics
    ``requested`` matches are a subset of those ``allowed`` matches (so nothing is denied
    needlessly, and every refusal has a witness topic)."""
    all_filters = [
        "/".join(levels)
        for size in range(1, _MAX_FILTER_LEVELS + 1)
        for levels in itertools.product(_FILTER_LEVELS, repeat=size)
        if is_valid_filter("/".join(levels))
    ]
    matched = {f: frozenset(t for t in _UNIVERSE if matches(t, f)) for f in all_filters}
    wrong = [
        (allowed, requested)
        for allowed in all_filters
        for requested in all_filters
        if filter_covers(allowed, requested) is not (matched[requested] <= matched[allowed])
    ]
    assert wrong == []


@given(topic_filter=filters)
def test_covers_is_reflexive(topic_filter: str) -> None:
    assert filter_covers(topic_filter, topic_filter)


@given(a=filters, b=filters, c=filters)
def test_covers_is_transitive(a: str, b: str, c: str) -> None:
    if filter_covers(a, b) and filter_covers(b, c):
        assert filter_covers(a, c)


# --- Acl -----------------------------------------------------------------------------------------


def test_acl_checks() -> None:
    acl = Acl(subscribe=("market/#", "user/alice/#"), publish=("user/+/orders",))
    assert acl.may_subscribe("market/luno/+")
    assert acl.may_subscribe("user/alice/alerts")
    assert not acl.may_subscribe("user/+/alerts")
    assert not acl.may_subscribe("#")
    assert not acl.may_subscribe("market/#/x")  # invalid filter
    assert acl.may_publish("user/bob/orders")
    assert not acl.may_publish("user/bob/orders/x")
    assert not acl.may_publish("user/+/orders")  # a filter is not a topic
    assert not acl.may_publish("")
    assert acl.may_receive("market/luno/BTC-ZAR")
    assert acl.may_receive("user/alice/x")
    assert not acl.may_receive("user/bob/x")
    assert not acl.may_receive("market/+")


def test_empty_acl_denies_everything() -> None:
    acl = Acl(subscribe=(), publish=())
    assert not acl.may_subscribe("a")
    assert not acl.may_publish("a")
    assert not acl.may_receive("a")


def test_allow_all() -> None:
    assert ALLOW_ALL.may_subscribe("#")
    assert ALLOW_ALL.may_publish("anything/at/all")
    assert ALLOW_ALL.may_receive("x")
    # '#' does not reach '$' topics; that is intended.
    assert not ALLOW_ALL.may_subscribe("$SYS/#")
    assert not ALLOW_ALL.may_receive("$SYS/broker/uptime")


# --- acl_for -------------------------------------------------------------------------------------


def _claims(
    role: Role = "subscriber",
    sub: str = "alice",
    sub_acl: tuple[str, ...] | None = None,
    pub_acl: tuple[str, ...] | None = None,
) -> Claims:
    return Claims(sub=sub, role=role, sub_acl=sub_acl, pub_acl=pub_acl, exp=0.0)


def _raw_claims(
    role: Role = "subscriber",
    sub: str = "alice",
    sub_acl: tuple[str, ...] | None = None,
    pub_acl: tuple[str, ...] | None = None,
) -> Claims:
    """Claims that skipped validation: acl_for must stay safe even if Claims' checks change."""
    return Claims(sub=sub, role=role, sub_acl=sub_acl, pub_acl=pub_acl, exp=0.0)


@pytest.mark.parametrize(
    ("role", "subscribe", "publish"),
    [
        ("subscriber", ("market/#", "user/alice/#"), ()),
        ("feed", ("market/#",), ("market/#",)),
        ("service", ("service/alice/#",), ("user/+/#",)),
        ("admin", ("#",), ("#",)),
    ],
)
def test_role_defaults(role: Role, subscribe: tuple[str, ...], publish: tuple[str, ...]) -> None:
    assert acl_for(_claims(role=role)) == Acl(subscribe=subscribe, publish=publish)


@pytest.mark.parametrize(
    ("role", "action", "target", "allowed"),
    [
        ("subscriber", "subscribe", "market/luno/BTC-ZAR", True),
        ("subscriber", "subscribe", "user/alice/alerts/#", True),
        ("subscriber", "subscribe", "user/bob/alerts", False),
        ("subscriber", "subscribe", "user/+/alerts", False),
        ("subscriber", "publish", "market/luno/BTC-ZAR", False),
        ("subscriber", "publish", "user/alice/x", False),
        ("feed", "publish", "market/luno/BTC-ZAR", True),
        ("feed", "publish", "user/alice/x", False),
        ("feed", "subscribe", "user/alice/#", False),
        ("service", "publish", "user/alice/alerts", True),
        ("service", "publish", "market/luno/BTC-ZAR", False),
        ("service", "subscribe", "market/#", False),
        ("admin", "subscribe", "#", True),
        ("admin", "publish", "market/luno/BTC-ZAR", True),
        ("admin", "subscribe", "$SYS/#", False),
    ],
)
def test_role_decisions(role: Role, action: str, target: str, allowed: bool) -> None:
    acl = acl_for(_claims(role=role))
    check = acl.may_subscribe if action == "subscribe" else acl.may_publish
    assert check(target) is allowed


def test_sub_acl_replaces_only_the_subscribe_side() -> None:
    acl = acl_for(_claims(role="feed", sub_acl=("market/luno/#",)))
    assert acl == Acl(subscribe=("market/luno/#",), publish=("market/#",))


def test_pub_acl_replaces_only_the_publish_side() -> None:
    acl = acl_for(_claims(role="subscriber", pub_acl=("user/{sub}/orders",)))
    assert acl == Acl(subscribe=("market/#", "user/alice/#"), publish=("user/alice/orders",))


def test_empty_override_removes_the_default() -> None:
    acl = acl_for(_claims(role="admin", sub_acl=(), pub_acl=()))
    assert acl == Acl(subscribe=(), publish=())


def test_override_can_grant_sys() -> None:
    acl = acl_for(_claims(role="admin", sub_acl=("#", "$SYS/#")))
    assert acl.may_subscribe("$SYS/broker/+")
    assert acl.may_receive("$SYS/broker/uptime")


@pytest.mark.parametrize(
    ("sub", "sub_acl", "expected"),
    [
        ("alice", ("user/{sub}/#",), ("user/alice/#",)),
        ("bob", ("{sub}/{sub}/+",), ("bob/bob/+",)),  # every occurrence
        ("bob", ("x/{sub}-feed",), ("x/bob-feed",)),  # inside a level
        ("bob", ("market/#", "market/#"), ("market/#",)),  # duplicates collapse
        ("$SYS", ("{sub}/#", "user/{sub}/#"), ()),  # would otherwise reach the system topics
        # A subject that is not one plain level must not widen the grant: those filters go.
        ("+", ("user/{sub}/#", "market/#"), ("market/#",)),
        ("#", ("user/{sub}/#",), ()),
        ("a/b", ("user/{sub}/#",), ()),
        ("bob/#", ("user/{sub}",), ()),
        ("", ("user/{sub}/#",), ()),
        ("a\x00", ("user/{sub}/#",), ()),
    ],
)
def test_sub_substitution(sub: str, sub_acl: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert acl_for(_raw_claims(sub=sub, sub_acl=sub_acl)).subscribe == expected


def test_subscriber_with_unsafe_sub_keeps_market_only() -> None:
    acl = acl_for(_raw_claims(sub="+"))
    assert acl.subscribe == ("market/#",)
    assert not acl.may_subscribe("user/bob/#")


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (("market/#", "a/#/b"), ("market/#",)),
        (("", "ok"), ("ok",)),
        (("a+", "a/+"), ("a/+",)),
        (("a#", "#"), ("#",)),
        (("x\x00",), ()),
    ],
)
def test_invalid_filters_are_dropped(filters: tuple[str, ...], expected: tuple[str, ...]) -> None:
    acl = acl_for(_raw_claims(sub_acl=filters, pub_acl=filters))
    assert acl.subscribe == expected
    assert acl.publish == expected


@given(
    sub=st.text(max_size=8),
    sub_acl=st.none() | st.lists(st.text(max_size=12), max_size=4).map(tuple),
    pub_acl=st.none() | st.lists(st.text(max_size=12), max_size=4).map(tuple),
    role=st.sampled_from(ROLES),
)
def test_acl_for_is_total(
    sub: str, sub_acl: tuple[str, ...] | None, pub_acl: tuple[str, ...] | None, role: Role
) -> None:
    acl = acl_for(_raw_claims(role=role, sub=sub, sub_acl=sub_acl, pub_acl=pub_acl))
    assert all(is_valid_filter(f) for f in acl.subscribe + acl.publish)


def test_unknown_role_gets_nothing() -> None:
    # Only reachable by skipping validation; the cast is the point of the test.
    claims = Claims(sub="alice", role=cast(Role, "root"), exp=0.0)
    assert acl_for(claims) == Acl(subscribe=(), publish=())


_TICK = b'{"exchange":"luno","pair":"BTC-ZAR","bid":"1","ask":"2","last":"1","volume_24h":"1","ts":"2026-11-30T11:00:00.000Z","seq":9}'
WILLS = [
    # (role, topic, payload, refused because ... or None)
    ("feed", "market/luno/BTC-ZAR", _TICK, None),
    ("feed", "market/luno/BTC-ZAR", b"not json", "not a valid tick"),
    ("feed", "market/valr/BTC-ZAR", _TICK, "not a valid tick"),  # the tick is for another topic
    ("feed", "market/#", _TICK, "not a topic name"),
    ("feed", "market/+/BTC-ZAR", _TICK, "not a topic name"),
    ("feed", "", _TICK, "not a topic name"),
    ("subscriber", "market/luno/BTC-ZAR", _TICK, "may not publish"),
    ("subscriber", "user/bob/alerts", b"locked", "may not publish"),
    ("service", "user/bob/alerts", b"gone", None),
    ("service", "market/luno/BTC-ZAR", _TICK, "may not publish"),
    ("admin", "$SYS/broker/uptime", b"0", "not a topic name"),
    ("admin", "status/" + "x" * 250, b"0", "too long"),
    ("admin", "status/" + "x" * 240, b"0", None),
]


@pytest.mark.parametrize(("role", "topic", "payload", "refused"), WILLS)
def test_a_will_is_held_to_the_rules_of_a_publish(
    role: Role, topic: str, payload: bytes, refused: str | None
) -> None:
    found = will_refusal(acl_for(_claims(role)), topic, payload, max_topic_bytes=256)
    assert (found is None) is (refused is None), found
    if refused is not None:
        assert found is not None
        assert refused in found
