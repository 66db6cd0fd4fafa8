"""A cache whose entries are valid while a version is unchanged, bounded in entries and bytes.

The keys are the clients' choice (a SUBSCRIBE's filter set, say), so a cache of what they
select must be bounded: past either bound the whole cache is emptied and rebuilt on demand,
which is cheap next to tracking an order. An entry built at another version is a miss (the
caller bumps its version on every change that makes entries stale). No I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["VersionedCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class VersionedCache(Generic[K, V]):
    """key -> (version, value, size); ``max_bytes`` bounds the sum of the sizes given."""

    __slots__ = ("_bytes", "_entries", "_max_bytes", "_max_entries")

    def __init__(self, *, max_entries: int, max_bytes: float = math.inf) -> None:
        self._entries: dict[K, tuple[int, V, int]] = {}
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0

    def get(self, key: K, version: int) -> V | None:
        """The value built at ``version``, or None."""
        entry = self._entries.get(key)
        if entry is None or entry[0] != version:
            return None
        return entry[1]

    def put(self, key: K, version: int, value: V, size: int = 0) -> None:
        """Keep ``value`` (``size`` bytes) for ``key`` at ``version``; past a bound, the rest goes."""
        stale = self._entries.get(key)
        held = self._bytes + size - (stale[2] if stale is not None else 0)
        if len(self._entries) >= self._max_entries or held > self._max_bytes:
            self._entries.clear()
            held = size
        self._bytes = held
        self._entries[key] = (version, value, size)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes held, by the sizes given to :meth:`put`."""
        return self._bytes
