"""ZoneMemo (bridge/core/zone_memo.py): table-driven, no broker, no clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bridge.core.zone_memo import ZoneMemo

Step = Callable[[ZoneMemo], object]


def _remember(user: str, override: str | None, now: float) -> Step:
    return lambda memo: memo.remember(user, override, now, memo.ticket())


@pytest.mark.parametrize(
    ("steps", "user", "now", "expected"),
    [
        pytest.param([], "ann", 0.0, None, id="never-asked"),
        pytest.param([_remember("ann", "Africa/Lagos", 0.0)], "ann", 5.0, "Africa/Lagos", id="remembered"),
        pytest.param([_remember("ann", None, 0.0)], "ann", 5.0, "", id="no-override-is-known-too"),
        pytest.param([_remember("ann", "Africa/Lagos", 0.0)], "ann", 10.0, None, id="expired-at-ttl"),
        pytest.param([_remember("ann", "Africa/Lagos", 0.0)], "bob", 5.0, None, id="other-user"),
        pytest.param(
            [_remember("ann", "Africa/Lagos", 0.0), lambda memo: memo.changed("ann")],
            "ann",
            5.0,
            None,
            id="changed-forgets",
        ),
        pytest.param(
            [_remember("ann", "Africa/Lagos", 0.0), lambda memo: memo.changed("bob")],
            "ann",
            5.0,
            "Africa/Lagos",
            id="another-users-change-keeps-it",
        ),
        pytest.param(
            [_remember("ann", "Africa/Lagos", 0.0), _remember("ann", "Europe/Paris", 8.0)],
            "ann",
            12.0,
            "Europe/Paris",
            id="re-remembered-from-its-new-time",
        ),
    ],
)
def test_known(steps: list[Step], user: str, now: float, expected: str | None) -> None:
    memo = ZoneMemo(max_entries=10, ttl_s=10.0)
    for step in steps:
        step(memo)
    assert memo.known(user, now) == expected


@pytest.mark.parametrize(
    ("change_between", "kept"),
    [
        pytest.param(False, True, id="no-change-meanwhile"),
        pytest.param(True, False, id="a-change-overlapped-the-lookup"),
    ],
)
def test_a_lookup_that_overlapped_a_change_is_not_remembered(change_between: bool, kept: bool) -> None:
    memo = ZoneMemo(max_entries=10, ttl_s=10.0)
    ticket = memo.ticket()
    if change_between:
        memo.changed("ann")
    assert memo.remember("ann", "Africa/Lagos", 0.0, ticket) is kept
    assert (memo.known("ann", 1.0) == "Africa/Lagos") is kept


@pytest.mark.parametrize(
    ("users", "max_entries", "left"),
    [
        pytest.param(["a", "b", "c"], 3, ["a", "b", "c"], id="at-the-bound"),
        pytest.param(["a", "b", "c", "d"], 3, ["b", "c", "d"], id="oldest-goes"),
        pytest.param(["a", "b", "c", "a", "d"], 3, ["c", "a", "d"], id="re-remembered-is-newest"),
        pytest.param(["a", "b"], 1, ["b"], id="bound-of-one"),
    ],
)
def test_entries_are_bounded_oldest_first(users: list[str], max_entries: int, left: list[str]) -> None:
    memo = ZoneMemo(max_entries=max_entries, ttl_s=10.0)
    for index, user in enumerate(users):
        memo.remember(user, "UTC", float(index), memo.ticket())
    assert list(memo.entries()) == left


def _list(overrides: dict[str, str], now: float) -> Step:
    return lambda memo: memo.load_all(overrides, now, memo.ticket())


LISTING = {"ann": "Africa/Lagos", "bob": "Africa/Cairo"}


@pytest.mark.parametrize(
    ("steps", "user", "now", "expected"),
    [
        pytest.param([_list(LISTING, 0.0)], "ann", 5.0, "Africa/Lagos", id="listed"),
        pytest.param([_list(LISTING, 0.0)], "cat", 5.0, "", id="not-listed-means-none"),
        pytest.param([_list(LISTING, 0.0)], "cat", 10.0, None, id="listing-expired"),
        pytest.param(
            [_list(LISTING, 0.0), lambda m: m.changed("ann")], "ann", 5.0, None, id="changed-listed"
        ),
        pytest.param(
            [_list(LISTING, 0.0), lambda m: m.changed("cat")], "cat", 5.0, None, id="changed-unlisted"
        ),
        pytest.param(
            [_list(LISTING, 0.0), lambda m: m.changed("cat")], "bob", 5.0, "Africa/Cairo", id="others-kept"
        ),
        pytest.param(
            [_list(LISTING, 0.0), lambda m: m.changed("ann"), _remember("ann", "Europe/Paris", 1.0)],
            "ann",
            5.0,
            "Europe/Paris",
            id="asked-again-after-a-change",
        ),
        pytest.param([_list(LISTING, 0.0), lambda m: m.drop_listing()], "cat", 5.0, None, id="dropped"),
        pytest.param(
            [_list(LISTING, 0.0), lambda m: m.changed("cat"), lambda m: m.changed("dan")],
            "bob",
            5.0,
            None,
            id="changes-past-max-listing-drop-it",
        ),
        pytest.param(
            [_list({"a": "UTC", "b": "UTC", "c": "UTC", "d": "UTC"}, 0.0)],
            "zed",
            5.0,
            None,
            id="too-long-to-keep",
        ),
    ],
)
def test_known_with_a_listing(steps: list[Step], user: str, now: float, expected: str | None) -> None:
    memo = ZoneMemo(max_entries=10, ttl_s=10.0, max_listing=3)
    for step in steps:
        step(memo)
    assert memo.known(user, now) == expected


def test_a_listing_that_overlapped_a_change_is_not_kept() -> None:
    memo = ZoneMemo(max_entries=10, ttl_s=10.0)
    ticket = memo.ticket()
    memo.changed("ann")  # while the listing was being read
    assert not memo.load_all(LISTING, 0.0, ticket)
    assert memo.known("cat", 5.0) is None
    assert memo.listing_due(5.0)
    assert memo.load_all(LISTING, 0.0, memo.ticket())
    assert not memo.listing_due(5.0)
    assert memo.listing_due(10.0)


@pytest.mark.parametrize(
    ("steps", "now", "due"),
    [
        pytest.param([], 0.0, True, id="never-listed"),
        pytest.param([_list(LISTING, 0.0)], 5.0, False, id="listing-in-use"),
        pytest.param([_list(LISTING, 0.0)], 10.0, True, id="listing-expired"),
        pytest.param(
            [_list({"a": "UTC", "b": "UTC", "c": "UTC", "d": "UTC"}, 0.0)], 5.0, False, id="too-long-put-off"
        ),
        pytest.param(
            [_list({"a": "UTC", "b": "UTC", "c": "UTC", "d": "UTC"}, 0.0)],
            10.0,
            True,
            id="tried-again-after-ttl",
        ),
        pytest.param([lambda m: m.listing_failed(0.0, 3.0)], 2.0, False, id="failed-put-off"),
        pytest.param([lambda m: m.listing_failed(0.0, 3.0)], 3.0, True, id="failed-tried-again"),
        pytest.param(
            [_list(LISTING, 0.0), lambda m: m.changed("cat"), lambda m: m.changed("dan")],
            5.0,
            False,
            id="overflow-keeps-the-schedule",
        ),
    ],
)
def test_listing_due(steps: list[Step], now: float, due: bool) -> None:
    memo = ZoneMemo(max_entries=10, ttl_s=10.0, max_listing=3)
    for step in steps:
        step(memo)
    assert memo.listing_due(now) is due
