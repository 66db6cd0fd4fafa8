"""The session cap and expiry rules (bridge/session_limits.py), table-driven, no broker."""

from __future__ import annotations

import pytest

from bridge.core.session_limits import SESSION_LIMIT, SessionRefusal, SessionTimes, expired, make_room, trim

MAKE_ROOM_CASES: list[tuple[str, SessionTimes, int, list[str] | None]] = [
    ("no sessions yet", {}, 3, []),
    ("room left", {"a": 10.0, "b": None}, 3, []),
    ("at the cap: the longest disconnected goes", {"a": 30.0, "b": 10.0, "c": 20.0}, 3, ["b"]),
    ("connected ones are never chosen", {"a": None, "b": 50.0, "c": None}, 3, ["b"]),
    ("ties broken by client id", {"z": 5.0, "y": 5.0, "x": None}, 3, ["y"]),
    ("a cap of one replaces the only session", {"a": 1.0}, 1, ["a"]),
    (
        "over the cap (it was lowered): enough go",
        {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0},
        2,
        ["d", "c", "b"],
    ),
    ("all connected: refused", {"a": None, "b": None, "c": None}, 3, None),
    ("over the cap, too few disconnected: refused", {"a": None, "b": None, "c": 1.0}, 2, None),
]


@pytest.mark.parametrize(
    ("sessions", "cap", "victims"),
    [case[1:] for case in MAKE_ROOM_CASES],
    ids=[c[0] for c in MAKE_ROOM_CASES],
)
def test_make_room(sessions: SessionTimes, cap: int, victims: list[str] | None) -> None:
    result = make_room(sessions, cap)
    if victims is None:
        assert isinstance(result, SessionRefusal)
        assert result.reason == SESSION_LIMIT
        assert f"at most {cap}" in result.detail
    else:
        assert result == victims


TRIM_CASES: list[tuple[dict[str, float], int, list[str]]] = [
    ({}, 2, []),
    ({"a": 1.0, "b": 2.0}, 2, []),
    ({"a": 1.0, "b": 3.0, "c": 2.0}, 2, ["a"]),
    ({"a": 1.0, "b": 3.0, "c": 2.0, "d": 9.0}, 1, ["a", "c", "b"]),
]


@pytest.mark.parametrize(("sessions", "cap", "victims"), TRIM_CASES)
def test_trim_keeps_the_most_recently_used(sessions: dict[str, float], cap: int, victims: list[str]) -> None:
    assert trim(sessions, cap) == victims


EXPIRED_CASES: list[tuple[SessionTimes, float, list[str]]] = [
    ({}, 1000.0, []),
    ({"connected": None}, 10**9, []),
    ({"just_under": 901.0, "exactly": 900.0, "over": 899.5}, 1000.0, ["over"]),
    ({"b": 100.0, "a": 100.0, "c": 50.0, "live": None, "fresh": 999.0}, 1000.0, ["c", "a", "b"]),
]


@pytest.mark.parametrize(("sessions", "now", "gone"), EXPIRED_CASES)
def test_expired_means_disconnected_longer_than_expiry(
    sessions: SessionTimes, now: float, gone: list[str]
) -> None:
    assert expired(sessions, now=now, expiry_s=100.0) == gone
