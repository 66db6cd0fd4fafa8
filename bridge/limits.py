"""Connection accounting: how many sessions each user, and the broker as a whole, may hold;
and the caps on what one session may subscribe to (:func:`subscribe_refusal`).

The broker talks to :class:`ConnectionLimits` only, so a shared (e.g. Redis-backed) counter
for several broker processes can replace :class:`LocalConnectionLimits` later. Pure and
I/O-free; not thread-safe (one event loop owns it).

A successful ``acquire`` returns a :class:`Lease`, the only thing that can give the slot back.
Leases make release idempotent: disconnect paths can run more than once (error + close) and
a taken-over session's late release must not free the slot its successor now holds.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "ConnectionLimits",
    "Lease",
    "LimitRefusal",
    "LocalConnectionLimits",
    "SubscribeRefusal",
    "subscribe_refusal",
]

# Process-wide, so leases from two limiters never share an id and cannot be confused.
_lease_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Lease:
    """One counted connection. ``id`` is unique per process; treat it as opaque."""

    id: str
    user: str


@dataclass(frozen=True, slots=True)
class LimitRefusal:
    """Why a connection was refused; ``reason`` is a stable code for logs and metrics."""

    reason: Literal["user_limit", "global_limit"]
    detail: str


class ConnectionLimits(Protocol):
    def acquire(self, user: str, *, replacing: Lease | None = None) -> Lease | LimitRefusal:
        """Count a new connection for ``user``, or refuse it.

        ``replacing`` is the lease of the session being taken over: when it is live and
        belongs to ``user`` it is transferred (the old lease stops counting) instead of a
        new slot being taken, so a user at the limit can still reconnect.
        """
        ...

    def release(self, lease: Lease) -> None:
        """Give the slot back; unknown or already released leases are ignored."""
        ...

    def count(self, user: str) -> int: ...

    @property
    def total(self) -> int: ...

    def per_user(self) -> dict[str, int]:
        """A snapshot of the users with at least one connection (the caller may mutate it)."""
        ...


class LocalConnectionLimits:
    """Exact in-process counts."""

    def __init__(self, max_per_user: int, max_total: int) -> None:
        if max_per_user < 0 or max_total < 0:
            raise ValueError(f"limits must be >= 0, got max_per_user={max_per_user}, max_total={max_total}")
        self.max_per_user = max_per_user
        self.max_total = max_total
        self._live: dict[str, Lease] = {}  # the leases this limiter issued and still counts
        self._counts: dict[str, int] = {}  # users with count >= 1 only: memory follows live users

    def _is_live(self, lease: Lease) -> bool:
        # Compare the whole lease, not just the id, so a forged or foreign lease never matches.
        return self._live.get(lease.id) == lease

    def _issue(self, user: str) -> Lease:
        lease = Lease(id=f"local-{next(_lease_ids)}", user=user)
        self._live[lease.id] = lease
        return lease

    def acquire(self, user: str, *, replacing: Lease | None = None) -> Lease | LimitRefusal:
        if replacing is not None and replacing.user == user and self._is_live(replacing):
            # Takeover: a fresh id retires the old lease, so the old session's release later on
            # is a no-op; the counts do not change.
            del self._live[replacing.id]
            return self._issue(user)
        # Global first: when the broker is full, that is the reason, whatever the user holds.
        if len(self._live) >= self.max_total:
            return LimitRefusal(
                "global_limit", f"broker has {len(self._live)} of {self.max_total} connections"
            )
        held = self._counts.get(user, 0)
        if held >= self.max_per_user:
            return LimitRefusal("user_limit", f"user {user!r} has {held} of {self.max_per_user} connections")
        self._counts[user] = held + 1
        return self._issue(user)

    def release(self, lease: Lease) -> None:
        if not self._is_live(lease):
            return
        del self._live[lease.id]
        remaining = self._counts[lease.user] - 1
        if remaining:
            self._counts[lease.user] = remaining
        else:
            del self._counts[lease.user]

    def count(self, user: str) -> int:
        return self._counts.get(user, 0)

    @property
    def total(self) -> int:
        return len(self._live)

    def per_user(self) -> dict[str, int]:
        return dict(self._counts)


# Why a SUBSCRIBE's filter was refused by the caps (SUBACK 0x80); stable, for logs and metrics.
SubscribeRefusal = Literal["too_many_filters", "filter_too_long"]


def subscribe_refusal(
    topic_filter: str, held: Collection[str], *, max_filters: int, max_topic_bytes: int
) -> SubscribeRefusal | None:
    """Why the caps refuse ``topic_filter`` for a session holding ``held``; None if they allow it.

    A filter the session already holds is a replacement (MQTT-3.8.4-3), so it never counts
    against ``max_filters``. Call once per filter, in packet order, with ``held`` as it is at
    that moment (filters granted earlier in the same SUBSCRIBE included), so a filter the ACL
    refuses takes no slot. Length is in UTF-8 bytes, as on the wire.
    """
    # A str of n characters is n to 4n UTF-8 bytes: encode only when it can matter.
    if len(topic_filter) > max_topic_bytes or (
        len(topic_filter) * 4 > max_topic_bytes
        and len(topic_filter.encode("utf-8", "surrogatepass")) > max_topic_bytes
    ):
        return "filter_too_long"
    if len(held) >= max_filters and topic_filter not in held:
        return "too_many_filters"
    return None
