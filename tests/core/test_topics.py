"""bridge.core.topics: MQTT 3.1.1 topic/filter validation, matching, and the TopicIndex trie."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.core.topics import TopicIndex, is_valid_filter, is_valid_topic, matcher, matches

# --- is_valid_topic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "valid"),
    [
        ("a", True),
        ("market/luno/BTC-ZAR", True),
        ("/", True),  # two empty levels are still levels
        ("a//b", True),
        ("/leading", True),
        ("trailing/", True),
        ("$SYS/broker/uptime", True),
        (" ", True),
        ("ünïcödé/主题", True),
        ("x" * 65535, True),  # exactly the limit
        ("x" * 65536, False),
        ("é" * 32767, True),  # 65534 UTF-8 bytes
        ("é" * 32768, False),  # 65536 UTF-8 bytes: the limit is in bytes, not characters
        ("", False),
        ("a/+", False),
        ("+", False),
        ("a/#", False),
        ("#", False),
        ("a+b", False),
        ("a#b", False),
        ("a\x00b", False),
    ],
)
def test_is_valid_topic(topic: str, valid: bool) -> None:
    assert is_valid_topic(topic) is valid


# --- is_valid_filter --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "valid"),
    [
        ("a", True),
        ("a/b/c", True),
        ("#", True),
        ("+", True),
        ("a/#", True),
        ("+/#", True),
        ("+/+/+", True),
        ("a/+/b", True),
        ("/#", True),
        ("a//b", True),
        ("/", True),
        ("$SYS/#", True),
        ("+/tennis/#", True),
        ("", False),
        ("a/#/b", False),  # '#' only as the last level
        ("#/a", False),
        ("a#", False),
        ("a/b#", False),
        ("##", False),
        ("a+", False),
        ("+a/b", False),
        ("a/+b", False),
        ("++", False),
        ("a\x00", False),
        ("a/+#", False),
    ],
)
def test_is_valid_filter(topic_filter: str, valid: bool) -> None:
    assert is_valid_filter(topic_filter) is valid


# --- matches ----------------------------------------------------------------------------------

MATCH_CASES: list[tuple[str, str, bool]] = [
    # exact
    ("a", "a", True),
    ("a/b/c", "a/b/c", True),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("a/b", "a/c", False),
    ("A", "a", False),  # case-sensitive
    # '+' fills exactly one level
    ("sport/tennis", "sport/+", True),
    ("sport", "sport/+", False),
    ("sport/tennis/player1", "sport/+", False),
    ("sport/", "sport/+", True),  # the empty level after '/' is a level
    ("/finance", "+/+", True),
    ("/finance", "/+", True),
    ("/finance", "+", False),
    ("a/b/c", "+/b/+", True),
    ("a/x/c", "+/b/+", False),
    ("a", "+", True),
    # '#' matches the parent and any number of levels below
    ("sport", "sport/#", True),
    ("sport/tennis", "sport/#", True),
    ("sport/tennis/player1/ranking", "sport/#", True),
    ("sports", "sport/#", False),
    ("sport/", "sport/#", True),
    ("a", "#", True),
    ("a/b/c", "#", True),
    ("/", "#", True),
    ("sport/tennis/player1", "sport/tennis/player1/#", True),
    ("sport/tennis", "sport/tennis/player1/#", False),
    ("sport/tennis/x", "sport/+/#", True),
    ("sport/tennis", "sport/+/#", True),
    ("sport", "sport/+/#", False),
    # empty levels are real levels
    ("a//b", "a//b", True),
    ("a//b", "a/+/b", True),
    ("a/b", "a//b", False),
    ("a//b", "a/b", False),
    ("a//b", "a/#", True),
    ("/a", "a", False),
    ("a/", "a", False),
    # '$' topics: no wildcard in the first level matches them
    ("$SYS/x", "#", False),
    ("$SYS/x", "+/x", False),
    ("$SYS", "+", False),
    ("$SYS/x", "+/#", False),
    ("$SYS/x", "$SYS/#", True),
    ("$SYS", "$SYS/#", True),
    ("$SYS/x", "$SYS/+", True),
    ("$SYS/x", "$SYS/x", True),
    ("a/$x", "a/+", True),  # only the first level is special
    ("a/$x", "#", True),
    ("x$/a", "+/a", True),
]


@pytest.mark.parametrize(("topic", "topic_filter", "expected"), MATCH_CASES)
def test_matches(topic: str, topic_filter: str, expected: bool) -> None:
    assert matches(topic, topic_filter) is expected


@pytest.mark.parametrize(("topic", "topic_filter", "expected"), MATCH_CASES)
def test_matcher(topic: str, topic_filter: str, expected: bool) -> None:
    assert matcher(topic_filter)(topic) is expected


# --- TopicIndex -------------------------------------------------------------------------------


@pytest.mark.parametrize(("topic", "topic_filter", "expected"), MATCH_CASES)
def test_index_single_filter_agrees_with_matches(topic: str, topic_filter: str, expected: bool) -> None:
    index = TopicIndex()
    index.add(topic_filter)
    assert index.match(topic) == ([topic_filter] if expected else [])


FILTERS = [
    "#",
    "+",
    "sport",
    "sport/#",
    "sport/+",
    "sport/tennis",
    "sport/tennis/#",
    "sport/+/player1",
    "+/tennis/#",
    "+/+",
    "$SYS/#",
    "$SYS/+",
    "a//b",
    "a/+/b",
    "/#",
]


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("sport", {"#", "+", "sport", "sport/#"}),
        ("sport/tennis", {"#", "sport/#", "sport/+", "sport/tennis", "sport/tennis/#", "+/tennis/#", "+/+"}),
        ("sport/tennis/player1", {"#", "sport/#", "sport/tennis/#", "sport/+/player1", "+/tennis/#"}),
        ("sport/golf/player1", {"#", "sport/#", "sport/+/player1"}),
        ("news/tennis", {"#", "+/tennis/#", "+/+"}),
        ("$SYS/x", {"$SYS/#", "$SYS/+"}),
        ("$SYS", {"$SYS/#"}),
        ("$other/tennis", set()),
        ("a//b", {"#", "a//b", "a/+/b"}),
        ("a/x/b", {"#", "a/+/b"}),
        ("/", {"#", "+/+", "/#"}),
        ("/x", {"#", "+/+", "/#"}),
        ("unrelated/deep/topic/here", {"#"}),
    ],
)
def test_index_match_many(topic: str, expected: set[str]) -> None:
    index = TopicIndex()
    for topic_filter in FILTERS:
        index.add(topic_filter)
    found = index.match(topic)
    assert len(found) == len(set(found)), f"duplicates in {found}"
    assert set(found) == expected
    assert set(found) == {f for f in FILTERS if matches(topic, f)}


def test_index_empty() -> None:
    index = TopicIndex()
    assert len(index) == 0
    assert index.match("a") == []
    assert "a" not in index
    assert "#" not in index


def test_index_add_is_idempotent() -> None:
    index = TopicIndex()
    index.add("a/b")
    index.add("a/b")
    assert len(index) == 1
    assert index.match("a/b") == ["a/b"]


@pytest.mark.parametrize(
    ("added", "probe", "present"),
    [
        (["a/b"], "a/b", True),
        (["a/b"], "a", False),  # a prefix node exists but holds no filter
        (["a/b"], "a/b/c", False),
        (["a/b"], "a/+", False),
        (["a/+"], "a/+", True),
        (["#"], "#", True),
        (["a//b"], "a//b", True),
        (["a//b"], "a/b", False),
        (["a", "a/b"], "a", True),
        ([], "", False),
    ],
)
def test_index_contains(added: list[str], probe: str, present: bool) -> None:
    index = TopicIndex()
    for topic_filter in added:
        index.add(topic_filter)
    assert (probe in index) is present


@pytest.mark.parametrize("probe", [1, None, b"a/b", ("a", "b")])
def test_index_contains_non_str(probe: object) -> None:
    index = TopicIndex()
    index.add("a/b")
    index.add("#")
    assert (probe in index) is False


@pytest.mark.parametrize(
    ("added", "removed", "remaining"),
    [
        (["a/b"], "a/b", []),
        (["a", "a/b"], "a", ["a/b"]),  # removing the parent keeps the child
        (["a", "a/b"], "a/b", ["a"]),  # removing the child keeps the parent
        (["a/b", "a/c"], "a/b", ["a/c"]),
        (["a/#", "a/+", "a"], "a/+", ["a/#", "a"]),
        (["a/b"], "a", ["a/b"]),  # absent: only a prefix
        (["a/b"], "a/b/c", ["a/b"]),  # absent: longer than anything stored
        (["a/b"], "x", ["a/b"]),  # absent entirely
        ([], "a", []),
    ],
)
def test_index_remove(added: list[str], removed: str, remaining: list[str]) -> None:
    index = TopicIndex()
    for topic_filter in added:
        index.add(topic_filter)
    index.remove(removed)
    assert len(index) == len(remaining)
    assert removed not in index
    for topic_filter in remaining:
        assert topic_filter in index
    assert sorted(index.match("a/b")) == sorted(f for f in remaining if matches("a/b", f))


def test_index_remove_absent_twice_keeps_size() -> None:
    index = TopicIndex()
    index.add("a/b")
    index.remove("a/b")
    index.remove("a/b")
    assert len(index) == 0
    index.add("a/b")
    assert len(index) == 1
    assert index.match("a/b") == ["a/b"]


def test_index_remove_prunes_everything() -> None:
    index = TopicIndex()
    filters = [f"m/{i % 7}/{i}/#" for i in range(200)] + [f"+/{i}" for i in range(50)] + FILTERS
    for topic_filter in filters:
        index.add(topic_filter)
    assert len(index) == len(set(filters))
    for topic_filter in reversed(filters):
        index.remove(topic_filter)
    assert len(index) == 0
    assert index._root.children == {}
    assert index._root.terminal is None
    assert index.match("m/1/1") == []


def test_index_remove_prunes_only_dead_branches() -> None:
    index = TopicIndex()
    index.add("a/b/c/d")
    index.add("a/x")
    index.remove("a/b/c/d")
    assert list(index._root.children) == ["a"]
    assert list(index._root.children["a"].children) == ["x"]


# --- property: the index agrees with matches() ------------------------------------------------

_LEVELS = ["a", "b", ""]
_FIRST_LEVELS = [*_LEVELS, "$x"]

_topics = st.builds(
    lambda first, rest: "/".join([first, *rest]),
    st.sampled_from(_FIRST_LEVELS),
    st.lists(st.sampled_from(_LEVELS), max_size=3),
).filter(bool)  # '' alone is not a topic; '/' and 'a//b' are
_filters = st.builds(
    lambda first, rest, hash_tail: "/".join([first, *rest, *(["#"] if hash_tail else [])]),
    st.sampled_from([*_FIRST_LEVELS, "+"]),
    st.lists(st.sampled_from([*_LEVELS, "+"]), max_size=3),
    st.booleans(),
).filter(bool) | st.just("#")


@settings(max_examples=300, deadline=None)
@given(filters=st.sets(_filters, max_size=8), topics=st.lists(_topics, min_size=1, max_size=5))
def test_index_agrees_with_matches(filters: set[str], topics: list[str]) -> None:
    index = TopicIndex()
    for topic_filter in filters:
        assert is_valid_filter(topic_filter)
        index.add(topic_filter)
    assert len(index) == len(filters)
    for topic in topics:
        assert is_valid_topic(topic)
        assert sorted(index.match(topic)) == sorted(f for f in filters if matches(topic, f))
        assert {f for f in filters if matcher(f)(topic)} == {f for f in filters if matches(topic, f)}


@settings(max_examples=200, deadline=None)
@given(
    filters=st.lists(_filters, max_size=10),
    removed=st.lists(_filters, max_size=10),
    topic=_topics,
)
def test_index_after_removals_agrees_with_matches(filters: list[str], removed: list[str], topic: str) -> None:
    index = TopicIndex()
    for topic_filter in filters:
        index.add(topic_filter)
    for topic_filter in removed:
        index.remove(topic_filter)
    live = set(filters) - set(removed)
    assert len(index) == len(live)
    assert all(f in index for f in live)
    assert sorted(index.match(topic)) == sorted(f for f in live if matches(topic, f))
    for topic_filter in live:
        index.remove(topic_filter)
    assert index._root.children == {}
