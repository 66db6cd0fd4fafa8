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
