"""Which persistent sessions go: the per-user cap and expiry, as pure functions of times.

A user's persistent sessions are given as ``client id -> disconnected_at`` (epoch seconds),
None for one that is connected or being connected: such a session is never chosen. The
broker (bridge/edge/broker.py) does the deleting; the rules are here:

- ``limits.max_sessions_per_user``: a new persistent session past the cap replaces the
  user's longest-disconnected one(s) (:func:`make_room`); if the connected ones alone fill
  the cap, the CONNECT is refused. A restarted broker keeps only the ``cap`` most recently
  used sessions of a user (:func:`trim`).
- ``broker.session_expiry_s``: a session disconnected for longer than that goes
  (:func:`expired`).

Ties are broken by client id, so every choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["SESSION_LIMIT", "SessionRefusal", "SessionTimes", "expired", "make_room", "trim"]

SESSION_LIMIT: Final = "session_limit"  # the refusal reason in logs and metrics

SessionTimes = Mapping[str, float | None]


@dataclass(frozen=True, slots=True)
class SessionRefusal:
    """No room for a new persistent session: every one the user holds is in use."""

    detail: str
    reason: str = SESSION_LIMIT


def _longest_disconnected(sessions: SessionTimes, count: int) -> list[str] | None:
    """The ``count`` sessions disconnected longest, or None if fewer are disconnected."""
    idle = sorted((at, client_id) for client_id, at in sessions.items() if at is not None)
    return [client_id for _, client_id in idle[:count]] if len(idle) >= count else None


def make_room(sessions: SessionTimes, cap: int) -> list[str] | SessionRefusal:
    """The sessions to delete so that one more fits under ``cap`` (usually none or one).

    More than one only when the user already holds more than ``cap`` (the cap was lowered).
    Nothing is chosen when there are not enough disconnected ones to make room.
    """
    victims = _longest_disconnected(sessions, max(0, len(sessions) + 1 - cap))
    if victims is None:
        connected = sum(at is None for at in sessions.values())
        return SessionRefusal(f"{connected} of {len(sessions)} persistent sessions in use, at most {cap}")
    return victims


def trim(sessions: Mapping[str, float], cap: int) -> list[str]:
    """The sessions over ``cap`` to delete, longest disconnected first (all are disconnected)."""
    return _longest_disconnected(sessions, max(0, len(sessions) - cap)) or []


def expired(sessions: SessionTimes, *, now: float, expiry_s: float) -> list[str]:
    """The sessions disconnected for longer than ``expiry_s`` at ``now``, longest first."""
    gone = sorted(
        (at, client_id) for client_id, at in sessions.items() if at is not None and now - at > expiry_s
    )
    return [client_id for _, client_id in gone]
