"""What the store said each user's zone override is, remembered for a while (no I/O, no clock).

A reconnect storm must not queue on the store for the same answer, so a user's override
(``""`` for none) is kept until ``now + ttl_s``; the entries are bounded, the oldest dropped
first. A change of a user's zone forgets what was remembered, and a lookup that overlapped a
change (its :meth:`ZoneMemo.ticket` is stale when it returns) is used once but never
remembered: it may predate the change.

A first connection must not wait on the store either: :meth:`ZoneMemo.load_all` takes the
store's whole (small) listing of overrides, and until ``now + ttl_s`` a user not in it has
none. A change forgets that user's line of the listing; a listing that overlapped a change
is not kept.
"""

from __future__ import annotations

__all__ = ["ZoneMemo"]


class ZoneMemo:
    """user -> (override or ``""``, remembered until); the caller passes ``now``."""

    __slots__ = (
        "_all",
        "_all_until",
        "_entries",
        "_max_entries",
        "_max_listing",
        "_next_listing",
        "_ttl_s",
        "_writes",
    )

    def __init__(self, *, max_entries: int, ttl_s: float, max_listing: int = 100_000) -> None:
        self._entries: dict[str, tuple[str, float]] = {}  # the dict's order is the entries' age
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._writes = 0
        # The store's whole listing: user -> override, None for a user changed since (ask).
        self._all: dict[str, str | None] = {}
        self._all_until = float("-inf")
        self._next_listing = float("-inf")  # no listing is tried before this
        self._max_listing = max_listing  # lines of a listing, changed users included

    @property
    def max_listing(self) -> int:
        return self._max_listing

    def known(self, user: str, now: float) -> str | None:
        """The remembered override (``""``: the user has none), or None: ask the store."""
        entry = self._entries.get(user)
        if entry is not None and entry[1] > now:
            return entry[0]
        if now < self._all_until:
            return self._all.get(user, "")
        return None

    def listing_due(self, now: float) -> bool:
        """Whether to take a listing now: none is in use (or it expired), and the last try
        did not put the next one off (too many overrides, the store failing)."""
        return now >= self._next_listing and now >= self._all_until

    def load_all(self, overrides: dict[str, str], now: float, ticket: int) -> bool:
        """The store's every override, listed after :meth:`ticket` gave ``ticket``: kept unless
        a change overlapped the listing (asked again at the next miss) or it is longer than
        ``max_listing`` (not tried again for ``ttl_s``); whether it was kept."""
        if ticket != self._writes:
            return False
        if len(overrides) > self._max_listing:
            self.drop_listing(now)
            return False
        self._all = dict(overrides)
        self._all_until = self._next_listing = now + self._ttl_s
        return True

    def drop_listing(self, now: float | None = None) -> None:
        """Stop answering from the listing; with ``now``, take no other for ``ttl_s`` (the
        store has too many overrides to hold)."""
        self._all = {}
        self._all_until = float("-inf")
        if now is not None:
            self._next_listing = now + self._ttl_s

    def listing_failed(self, now: float, retry_s: float) -> None:
        """Taking a listing failed: the next try is no sooner than ``retry_s`` from now."""
        self._next_listing = now + retry_s

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
        if self._all_until > float("-inf"):
            if user not in self._all and len(self._all) >= self._max_listing:
                self.drop_listing()  # bounded: back to asking per user until the next listing
            else:
                self._all[user] = None  # the listing no longer knows this user

    def entries(self) -> dict[str, tuple[str, float]]:
        """A copy, oldest first (for tests and diagnostics)."""
        return dict(self._entries)
