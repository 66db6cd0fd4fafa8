"""The store contract: offline messages per user, persistent sessions, snapshots, time zones.

Two implementations pass one contract test suite (tests/test_store_contract.py):
:mod:`bridge.redis_store` (Redis; several broker nodes can share it) and
:mod:`bridge.sqlite_store` (embedded, on disk; used when no Redis URL is configured).

Offline queue semantics (both stores):

- Order: URGENT, HIGH, NORMAL, LOW; FIFO within a priority (by arrival).
- A message expires at ``expires_at``; expired messages are never returned and are
  removed (and counted) when met.
- Bounded per user by message count and payload bytes. On overflow the lowest-priority,
  oldest message goes (the new one counts, as the newest). What was evicted is returned,
  lowest priority first, never silent. If the new message itself would go (it has strictly
  the lowest priority of a full queue, or alone exceeds the byte limit), nothing queued
  changes and the result is ``EnqueueResult(stored=None, evicted=(m,))`` where ``m`` is the
  new message with ``id=""``.
- A message leaves only on :meth:`OfflineStore.ack` / :meth:`OfflineStore.ack_many` (after
  the client's PUBACK);
  :meth:`OfflineStore.mark_sent` counts deliveries so a resend carries DUP.
- Every multi-key change is atomic: a crash never leaves half a message.
- Enqueues may be grouped (:meth:`OfflineStore.enqueue_many`): one write for all of them,
  so a broker acknowledges each sender only after the commit that holds its message.

Persistent sessions (both stores): a :class:`SessionRecord` per client id, with the time
it was last disconnected (None while connected) so expiry survives a restart. A user's
offline queue exists only to be replayed to one of their persistent sessions:
:meth:`OfflineStore.purge_orphaned_queue` removes it once they own none.

Seq reservations (both stores; the rules they serve are in :mod:`bridge.core.sequencer`): one
:class:`SeqReservation` per market topic, plus one for ``bridge.core.sequencer.NEW_TOPICS`` (``""``).
:meth:`OfflineStore.reserve_seq` keeps, per topic, the larger ``reserved`` and the larger
``at`` of what it held and what it is given, and clears ``clean``: a late or repeated write
never lowers a reservation. :meth:`OfflineStore.release_seq` writes exactly what it is given
with ``clean`` set (a clean stop: ``reserved`` is the last seq handed out). Each call is
atomic: all of its topics or none.

All times are epoch seconds passed in by the caller (no clock inside the store).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from bridge.core.sequencer import SeqReservation
from bridge.errors import MarketBridgeError

__all__ = [
    "EnqueueResult",
    "NewMessage",
    "OfflineMessage",
    "OfflineStore",
    "Pending",
    "Priority",
    "QueueLimits",
    "SeqReservation",
    "SessionRecord",
    "Snapshot",
    "StoreError",
    "StoreUnavailable",
    "stored_message",
]


class StoreError(MarketBridgeError):
    """A store operation failed; nothing was reported as done that was not."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (e.g. Redis is down); the caller may retry later."""


class Priority(IntEnum):
    LOW = 0
    NORMAL = 1
    HIGH = 2
    URGENT = 3


@dataclass(frozen=True)
class QueueLimits:
    max_messages: int = 1000
    max_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class NewMessage:
    topic: str
    payload: bytes
    priority: Priority = Priority.NORMAL
    ttl_s: float = 86400.0
    qos: int = 1


@dataclass(frozen=True)
class OfflineMessage:
    id: str  # assigned by the store, opaque, unique per store
    user: str
    topic: str
    payload: bytes
    priority: Priority
    qos: int
    created_at: float
    expires_at: float
    sent: int = 0  # deliveries without an ack so far: a resend sets DUP


def stored_message(message_id: str, user: str, message: NewMessage, now: float) -> OfflineMessage:
    """``message`` as the store holds it once enqueued at ``now`` under ``message_id``."""
    return OfflineMessage(
        id=message_id,
        user=user,
        topic=message.topic,
        payload=message.payload,
        priority=Priority(message.priority),
        qos=message.qos,
        created_at=now,
        expires_at=now + message.ttl_s,
    )


@dataclass(frozen=True)
class EnqueueResult:
    stored: OfflineMessage | None  # None when the new message itself lost the eviction
    evicted: tuple[OfflineMessage, ...] = ()


@dataclass(frozen=True)
class Pending:
    messages: tuple[OfflineMessage, ...]
    expired: int  # expired messages removed while looking


@dataclass(frozen=True)
class SessionRecord:
    """A persistent session: who owns the client id and what it subscribed to (filter -> QoS).

    ``disconnected_at`` is when its last connection ended (epoch seconds), None while one is
    open (or when a broker stopped without saying).
    """

    client_id: str
    owner: str
    subscriptions: dict[str, int] = field(default_factory=dict)
    disconnected_at: float | None = None


@dataclass(frozen=True)
class Snapshot:
    """The retained last tick of a market topic and its seq (so sequencing resumes)."""

    topic: str
    payload: bytes
    seq: int


class OfflineStore(Protocol):
    """See the module docstring for the semantics every implementation keeps."""

    limits: QueueLimits

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` if the store cannot be reached."""

    async def enqueue(self, user: str, message: NewMessage, *, now: float) -> EnqueueResult: ...

    async def enqueue_many(
        self, messages: Sequence[tuple[str, NewMessage]], *, now: float
    ) -> list[EnqueueResult]:
        """Group commit: :meth:`enqueue` each (user, message), in order, as one write (one
        transaction, one durable commit). The results are in the same order. On
        :class:`StoreError` none is reported stored (SQLite: none is; Redis: one MULTI/EXEC,
        so none is unless Redis failed mid-way, which only repeats a message when resent)."""

    async def pending(self, user: str, *, now: float, limit: int, exclude: Collection[str] = ()) -> Pending:
        """Up to ``limit`` unexpired messages in delivery order, skipping ids in ``exclude``."""

    async def mark_sent(self, user: str, message_ids: Collection[str]) -> None: ...

    async def ack(self, user: str, message_id: str) -> bool:
        """Remove a delivered message; False if it was not there (already acked, expired)."""

    async def ack_many(self, user: str, message_ids: Collection[str]) -> int:
        """Remove delivered messages at once (one write); how many were there."""

    async def queue_size(self, user: str) -> tuple[int, int]:
        """(messages, payload bytes) queued for ``user``, expired ones included until met."""

    async def save_session(self, record: SessionRecord) -> None: ...

    async def delete_session(self, client_id: str) -> None: ...

    async def set_disconnected(self, client_ids: Collection[str], at: float | None) -> None:
        """Set (with None: clear) ``disconnected_at`` of those of these sessions that exist.

        Never creates a session; ids with no saved session are ignored.
        """

    async def purge_orphaned_queue(self, user: str) -> int:
        """Remove ``user``'s whole offline queue if they own no saved session; atomic with that
        check. The number of messages removed (0 when they still own a session)."""

    async def load_sessions(self) -> list[SessionRecord]: ...

    async def user_sessions(self, user: str) -> list[SessionRecord]:
        """The persistent sessions (and their subscriptions) owned by ``user``."""

    async def save_snapshots(self, snapshots: Collection[Snapshot]) -> None: ...

    async def load_snapshots(self) -> list[Snapshot]: ...

    async def reserve_seq(self, reservations: Collection[SeqReservation]) -> None:
        """Per topic keep the larger ``reserved`` and ``at``, clear ``clean``; atomic."""

    async def release_seq(self, reservations: Collection[SeqReservation]) -> None:
        """Write these exactly, ``clean`` set (given ``clean`` is ignored); atomic."""

    async def load_seq_reservations(self) -> list[SeqReservation]: ...

    async def set_user_tz(self, user: str, tz: str | None) -> None:
        """Override (or with None, clear) the user's time zone."""

    async def get_user_tzs(self, users: Collection[str]) -> dict[str, str]:
        """The overrides of those of ``users`` that have one (one round trip for all)."""

    async def list_user_tzs(self, limit: int) -> dict[str, str] | None:
        """Every user's override, or None when there are more than ``limit``."""

    async def close(self) -> None: ...
