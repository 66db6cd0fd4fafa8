"""What the store said each user's zone override is, remembered for a while (no I/O, no clock).

A reconnect storm must not queue on the store for the same answer, so a user's override
(``""`` for none) is kept until ``now + ttl_s``; the entries are bounded, the oldest dropped
first. A change of a user's zone forgets what was remembered, and a lookup that overlapped a
change (its :meth:`ZoneMemo.ticket` is stale when it returns) is used once but never
remembered: it may predate the change.
"""

from __future__ import annotations

__all__ = ["ZoneMemo"]


class ZoneMemo:
    """user -> (override or ``""``, remembered until); the caller passes ``now``."""

    __slots__ = ("_entries", "_max_entries", "_ttl_s", "_writes")

    def __init__(self, *, max_entries: int, ttl_s: float) -> None:
        self._entries: dict[str, tuple[str, float]] = {}  # the dict's order is the entries' age
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._writes = 0

    def known(self, user: str, now: float) -> str | None:
        """The remembered override (``""``: the user has none), or None: ask the store."""
        entry = self._entries.get(user)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def ticket(self) -> int:
        """Taken before asking the store; given back to :meth:`remember` with its answer."""
        return self._writes

    def remember(self, user: str, override: str | None, now: float, ticket: int) -> bool:
        """Keep the store's answer unless a change overlapped the lookup; whether it was kept."""
        if ticket != self._writes:
            return False
        self._entries.pop(user, None)  # re-inserted last: the newest
        if len(self._entries) >= self._max_entries and self._entries:
            del self._entries[next(iter(self._entries))]
        self._entries[user] = (override or "", now + self._ttl_s)
        return True

    def changed(self, user: str) -> None:
        """The user's zone is being (or was just) changed: forget it, and any lookup in flight."""
        self._writes += 1
        self._entries.pop(user, None)

    def entries(self) -> dict[str, tuple[str, float]]:
        """A copy, oldest first (for tests and diagnostics)."""
        return dict(self._entries)
