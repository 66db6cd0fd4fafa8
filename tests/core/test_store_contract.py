"""One contract suite for every :class:`~bridge.core.store.OfflineStore` (see bridge/core/store.py).

Each test runs against the SQLite store (a fresh file) and the Redis store (the session's
real redis-server, flushed per test). Times are passed in, so nothing sleeps.

Pinned conventions beyond the Protocol's types:

- Expired means ``expires_at <= now`` (``expires_at = now + ttl_s`` at enqueue).
- A refused message (its payload alone exceeds ``max_bytes``, or it would itself be the
  eviction victim) leaves the queue unchanged and returns
  ``EnqueueResult(stored=None, evicted=(m,))`` where ``m`` is the new message with
  ``id == ""``, ``sent == 0``, ``created_at == now``, ``expires_at == now + ttl_s``.
- ``evicted`` lists the removed messages lowest priority first, oldest first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from operator import attrgetter
from pathlib import Path

import pytest

from bridge.core.store import (
    EnqueueResult,
    NewMessage,
    OfflineMessage,
    OfflineStore,
    Priority,
    QueueLimits,
    SeqReservation,
    SessionRecord,
    Snapshot,
)
from bridge.sqlite_store import SqliteStore
from tests.conftest import unique

LIMITS = QueueLimits(max_messages=50, max_bytes=64 * 1024)
NOW = 1000.0
U, H, N, L = Priority.URGENT, Priority.HIGH, Priority.NORMAL, Priority.LOW


@dataclass
class Backend:
    """Opens stores of one kind on the same data (file or Redis) and closes them at teardown."""

    kind: str
    path: Path
    request: pytest.FixtureRequest
    opened: list[OfflineStore] = field(default_factory=list)

    async def open(self, limits: QueueLimits = LIMITS) -> OfflineStore:
        store: OfflineStore
        if self.kind == "sqlite":
            store = await SqliteStore.open(self.path, limits)
        else:
            # Imported here so the SQLite half runs even when the Redis store is missing.
            from bridge.redis_store import RedisStore  # noqa: PLC0415

            store = await RedisStore.open(self.request.getfixturevalue("redis_url"), limits)
        self.opened.append(store)
        return store

    async def close(self, store: OfflineStore) -> None:
        self.opened.remove(store)
        await store.close()

    async def close_all(self) -> None:
        while self.opened:
            await self.close(self.opened[-1])


BACKEND = pytest.StashKey[Backend]()


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OfflineStore]:
    backend = Backend(request.param, tmp_path / "store" / "offline.sqlite3", request)
    request.node.stash[BACKEND] = backend
    try:
        yield await backend.open()
    finally:
        await backend.close_all()


@pytest.fixture
def backend(store: OfflineStore, request: pytest.FixtureRequest) -> Backend:
    """The backend behind ``store``: opens more stores (other limits, reopen) on its data."""
    backend: Backend = request.node.stash[BACKEND]
    return backend


def msg(tag: str, priority: Priority = N, *, size: int = 0, ttl_s: float = 3600.0) -> NewMessage:
    """A message whose topic is ``tag`` (so orders read as tags); payload padded to ``size``."""
    payload = tag.encode().ljust(size, b".")
    return NewMessage(topic=tag, payload=payload, priority=priority, ttl_s=ttl_s, qos=1)


async def stored(store: OfflineStore, user: str, message: NewMessage, now: float = NOW) -> OfflineMessage:
    result = await store.enqueue(user, message, now=now)
    assert result.stored is not None, f"{message.topic} was not stored: {result}"
    assert result.evicted == ()
    return result.stored


async def order(store: OfflineStore, user: str, now: float = NOW) -> list[str]:
    return [m.topic for m in (await store.pending(user, now=now, limit=1000)).messages]


# --- order ---------------------------------------------------------------------------------

ORDER_CASES = [
    ([("a", L), ("b", N), ("c", H), ("d", U)], ["d", "c", "b", "a"]),
    ([("a", U), ("b", H), ("c", N), ("d", L)], ["a", "b", "c", "d"]),
    ([("a", N), ("b", N), ("c", N), ("d", N)], ["a", "b", "c", "d"]),
    ([("a", L), ("b", U), ("c", L), ("d", U), ("e", N)], ["b", "d", "e", "a", "c"]),
    ([("a", H), ("b", L), ("c", H), ("d", N), ("e", L), ("f", U)], ["f", "a", "c", "d", "b", "e"]),
    ([("a", N), ("b", H), ("c", N), ("d", H), ("e", N), ("f", H)], ["b", "d", "f", "a", "c", "e"]),
]


@pytest.mark.parametrize(("sequence", "expected"), ORDER_CASES)
async def test_priority_order_then_fifo(
    store: OfflineStore, sequence: list[tuple[str, Priority]], expected: list[str]
) -> None:
    user = unique()
    for tag, priority in sequence:
        await stored(store, user, msg(tag, priority))
    assert await order(store, user) == expected


async def test_fifo_holds_for_many_messages_of_one_priority(store: OfflineStore) -> None:
    """Arrival order is not lexical order of ids ("10" < "9" as strings)."""
    user = unique()
    tags = [f"m{i}" for i in range(25)]
    for tag in tags:
        await stored(store, user, msg(tag))
    assert await order(store, user) == tags


async def test_enqueue_returns_the_stored_message(store: OfflineStore) -> None:
    user = unique()
    message = NewMessage(topic="t/x", payload=b"\x00\xffbin", priority=H, ttl_s=10.0, qos=2)
    result = await store.enqueue(user, message, now=NOW)
    assert result.evicted == ()
    assert result.stored is not None
    assert result.stored.id != ""
    expected = OfflineMessage(
        id=result.stored.id,
        user=user,
        topic="t/x",
        payload=b"\x00\xffbin",
        priority=H,
        qos=2,
        created_at=NOW,
        expires_at=NOW + 10.0,
        sent=0,
    )
    assert result.stored == expected
    assert (await store.pending(user, now=NOW, limit=10)).messages == (expected,)


async def test_ids_are_unique(store: OfflineStore) -> None:
    users = [unique(), unique()]
    ids = [(await stored(store, user, msg(f"{i}"))).id for i in range(10) for user in users]
    assert len(set(ids)) == len(ids)


# --- expiry --------------------------------------------------------------------------------


async def test_expired_message_is_removed_and_counted_once(store: OfflineStore) -> None:
    user = unique()
    await stored(store, user, msg("old", ttl_s=10.0), now=1000.0)
    assert await order(store, user, now=1009.0) == ["old"]

    first = await store.pending(user, now=1011.0, limit=10)
    assert first.messages == ()
    assert first.expired == 1
    assert await store.queue_size(user) == (0, 0)

    again = await store.pending(user, now=1012.0, limit=10)
    assert again.expired == 0
    assert again.messages == ()
    assert await store.ack(user, "anything") is False


async def test_expires_exactly_at_expires_at(store: OfflineStore) -> None:
    user = unique()
    await stored(store, user, msg("edge", ttl_s=10.0), now=1000.0)
    result = await store.pending(user, now=1010.0, limit=10)
    assert (result.messages, result.expired) == ((), 1)


async def test_only_expired_messages_go(store: OfflineStore) -> None:
    user = unique()
    await stored(store, user, msg("short", U, ttl_s=5.0), now=1000.0)
    await stored(store, user, msg("long", L, ttl_s=500.0), now=1000.0)
    await stored(store, user, msg("short2", N, ttl_s=5.0), now=1000.0)
    result = await store.pending(user, now=1100.0, limit=10)
    assert [m.topic for m in result.messages] == ["long"]
    assert result.expired == 2
    assert (await store.queue_size(user))[0] == 1


async def test_queue_size_counts_expired_until_met(store: OfflineStore) -> None:
    user = unique()
    await stored(store, user, msg("x", size=10, ttl_s=1.0), now=1000.0)
    await stored(store, user, msg("y", size=20, ttl_s=1000.0), now=1000.0)
    assert await store.queue_size(user) == (2, 30)
    assert (await store.pending(user, now=1500.0, limit=10)).expired == 1
    assert await store.queue_size(user) == (1, 20)


# --- exclude, limit ------------------------------------------------------------------------


async def test_exclude_skips_ids(store: OfflineStore) -> None:
    user = unique()
    ids = [(await stored(store, user, msg(tag, p))).id for tag, p in [("a", U), ("b", H), ("c", N)]]
    result = await store.pending(user, now=NOW, limit=10, exclude={ids[0], ids[2], "not-an-id", "999999"})
    assert [m.topic for m in result.messages] == ["b"]
    assert await order(store, user) == ["a", "b", "c"]


async def test_limit_takes_the_first_in_order(store: OfflineStore) -> None:
    user = unique()
    for tag, priority in [("a", L), ("b", N), ("c", U), ("d", N), ("e", H)]:
        await stored(store, user, msg(tag, priority))
    got = await store.pending(user, now=NOW, limit=3)
    assert [m.topic for m in got.messages] == ["c", "e", "b"]
    assert (await store.pending(user, now=NOW, limit=1)).messages[0].topic == "c"
    assert (await store.pending(user, now=NOW, limit=0)).messages == ()
    window = await store.pending(user, now=NOW, limit=2, exclude=[m.id for m in got.messages])
    assert [m.topic for m in window.messages] == ["d", "a"]


# --- bounds --------------------------------------------------------------------------------


async def test_overflow_by_count_evicts_lowest_priority_oldest(backend: Backend) -> None:
    small = await backend.open(QueueLimits(max_messages=3, max_bytes=64 * 1024))
    user = unique()
    high = await stored(small, user, msg("high", H))
    low1 = await stored(small, user, msg("low1", L))
    await stored(small, user, msg("low2", L))

    result = await small.enqueue(user, msg("normal", N), now=NOW)
    assert result.stored is not None
    assert result.stored.topic == "normal"
    assert result.evicted == (low1,)
    assert await order(small, user) == ["high", "normal", "low2"]
    assert (await small.queue_size(user))[0] == 3

    # Equal priority: the older one goes, the new one stays.
    result = await small.enqueue(user, msg("low3", L), now=NOW)
    assert result.stored is not None
    assert [m.topic for m in result.evicted] == ["low2"]
    assert await order(small, user) == ["high", "normal", "low3"]

    result = await small.enqueue(user, msg("urgent", U), now=NOW)
    assert [m.topic for m in result.evicted] == ["low3"]
    assert await order(small, user) == ["urgent", "high", "normal"]
    assert high.id in {m.id for m in (await small.pending(user, now=NOW, limit=10)).messages}


async def test_overflow_by_bytes_evicts_as_many_as_needed(backend: Backend) -> None:
    small = await backend.open(QueueLimits(max_messages=100, max_bytes=100))
    user = unique()
    a = await stored(small, user, msg("a", N, size=30))
    b = await stored(small, user, msg("b", L, size=30))
    await stored(small, user, msg("c", H, size=30))
    d = await stored(small, user, msg("d", L, size=10))
    assert await small.queue_size(user) == (4, 100)

    result = await small.enqueue(user, msg("e", N, size=40), now=NOW)
    assert result.stored is not None
    # 140 bytes: 40 too many, so the two LOW ones go (oldest first), NORMAL a stays.
    assert result.evicted == (b, d)
    assert await small.queue_size(user) == (3, 100)
    assert await order(small, user) == ["c", "a", "e"]

    result = await small.enqueue(user, msg("f", N, size=60), now=NOW)
    assert result.stored is not None
    # No LOW left: the NORMAL ones go oldest first, a then e (f is newer); c (HIGH) stays.
    assert [m.topic for m in result.evicted] == ["a", "e"]
    assert result.evicted[0] == a
    assert await small.queue_size(user) == (2, 90)
    assert await order(small, user) == ["c", "f"]


async def test_oldest_goes_in_a_long_queue(backend: Backend) -> None:
    small = await backend.open(QueueLimits(max_messages=30, max_bytes=64 * 1024))
    user = unique()
    lows = [await stored(small, user, msg(f"l{i}", L)) for i in range(30)]
    result = await small.enqueue(user, msg("new", L), now=NOW)
    assert result.evicted == (lows[0],)
    result = await small.enqueue(user, msg("new2", N), now=NOW)
    assert result.evicted == (lows[1],)


async def test_one_large_message_evicts_many_small_ones(backend: Backend) -> None:
    small = await backend.open(QueueLimits(max_messages=1000, max_bytes=1000))
    user = unique()
    lows = [await stored(small, user, msg(f"l{i}", L, size=10)) for i in range(40)]
    await stored(small, user, msg("high", H, size=500))
    result = await small.enqueue(user, msg("big", N, size=500), now=NOW)
    assert result.stored is not None
    assert result.evicted == tuple(lows)
    assert await small.queue_size(user) == (2, 1000)


async def test_refused_after_many_candidates_changes_nothing(backend: Backend) -> None:
    """40 LOW messages are not enough room for a LOW newcomer: all stay, it is refused."""
    small = await backend.open(QueueLimits(max_messages=1000, max_bytes=1000))
    user = unique()
    for i in range(40):
        await stored(small, user, msg(f"l{i}", L, size=10))
    await stored(small, user, msg("high", H, size=560))
    result = await small.enqueue(user, msg("big", L, size=500), now=NOW)
    assert result.stored is None
    assert [(m.id, m.topic) for m in result.evicted] == [("", "big")]
    assert await small.queue_size(user) == (41, 960)
    assert await order(small, user) == ["high"] + [f"l{i}" for i in range(40)]


async def test_new_lowest_priority_message_is_refused_when_full(backend: Backend) -> None:
    small = await backend.open(QueueLimits(max_messages=2, max_bytes=64 * 1024))
    user = unique()
    await stored(small, user, msg("h", H))
    await stored(small, user, msg("n", N))

    result = await small.enqueue(user, msg("low", L, ttl_s=60.0), now=NOW)
    assert result == EnqueueResult(
        stored=None,
        evicted=(
            OfflineMessage(
                id="",
                user=user,
                topic="low",
                payload=b"low",
                priority=L,
                qos=1,
                created_at=NOW,
                expires_at=NOW + 60.0,
                sent=0,
            ),
        ),
    )
    assert await order(small, user) == ["h", "n"]
    assert await small.queue_size(user) == (2, 2)


async def test_refused_by_bytes_evicts_nothing(backend: Backend) -> None:
    """Evicting the LOW one would not make room for the NORMAL one: neither goes."""
    small = await backend.open(QueueLimits(max_messages=100, max_bytes=100))
    user = unique()
    await stored(small, user, msg("low", L, size=10))
    await stored(small, user, msg("high", H, size=80))
    result = await small.enqueue(user, msg("normal", N, size=30), now=NOW)
    assert result.stored is None
    assert [(m.id, m.topic) for m in result.evicted] == [("", "normal")]
    assert await order(small, user) == ["high", "low"]
    assert await small.queue_size(user) == (2, 90)


async def test_message_larger_than_max_bytes_is_refused(backend: Backend) -> None:
    small = await backend.open(QueueLimits(max_messages=10, max_bytes=100))
    user = unique()
    await stored(small, user, msg("keep", L, size=10))
    big = msg("big", U, size=101)
    result = await small.enqueue(user, big, now=NOW)
    assert result.stored is None
    assert len(result.evicted) == 1
    refused = result.evicted[0]
    assert (refused.id, refused.topic, refused.payload, refused.priority) == ("", "big", big.payload, U)
    assert await order(small, user) == ["keep"]
    assert await small.queue_size(user) == (1, 10)
    # Exactly max_bytes fits (evicting the rest).
    result = await small.enqueue(user, msg("full", L, size=100), now=NOW)
    assert result.stored is not None
    assert [m.topic for m in result.evicted] == ["keep"]
    assert await small.queue_size(user) == (1, 100)


# --- delivery ------------------------------------------------------------------------------


async def test_ack_removes(store: OfflineStore) -> None:
    user = unique()
    first = await stored(store, user, msg("a", size=5))
    await stored(store, user, msg("b", size=7))
    assert await store.ack(user, first.id) is True
    assert await store.ack(user, first.id) is False
    assert await order(store, user) == ["b"]
    assert await store.queue_size(user) == (1, 7)
    assert await store.ack(user, "no-such-id") is False


async def test_ack_by_another_user_does_nothing(store: OfflineStore) -> None:
    owner, other = unique(), unique()
    message = await stored(store, owner, msg("mine"))
    assert await store.ack(other, message.id) is False
    assert await order(store, owner) == ["mine"]


async def test_mark_sent_increments_sent(store: OfflineStore) -> None:
    user = unique()
    a = await stored(store, user, msg("a", H))
    b = await stored(store, user, msg("b", N))
    await store.mark_sent(user, [a.id])
    await store.mark_sent(user, [a.id, b.id])
    await store.mark_sent(user, [])
    got = {m.topic: m.sent for m in (await store.pending(user, now=NOW, limit=10)).messages}
    assert got == {"a": 2, "b": 1}
    assert await store.queue_size(user) == (2, 2)


async def test_queues_of_users_are_independent(backend: Backend) -> None:
    small = await backend.open(QueueLimits(max_messages=2, max_bytes=64 * 1024))
    alice, bob = unique("alice"), unique("bob")
    a1 = await stored(small, alice, msg("a1", L, ttl_s=5.0))
    await stored(small, alice, msg("a2", L, ttl_s=5.0))
    await stored(small, bob, msg("b1", L))
    await stored(small, bob, msg("b2", L))
    result = await small.enqueue(bob, msg("b3", L), now=NOW)
    assert [m.topic for m in result.evicted] == ["b1"]
    assert await order(small, alice) == ["a1", "a2"]
    assert await small.ack(bob, a1.id) is False
    await small.mark_sent(bob, [a1.id])
    assert (await small.pending(alice, now=NOW, limit=1)).messages[0].sent == 0
    # Bob's pending after Alice's messages expired does not remove Alice's.
    assert (await small.pending(bob, now=NOW + 100, limit=10)).expired == 0
    assert await small.queue_size(alice) == (2, 4)
    assert await small.queue_size(bob) == (2, 4)
    assert await small.queue_size(unique("nobody")) == (0, 0)


# --- sessions, snapshots, time zones -------------------------------------------------------


async def test_sessions(store: OfflineStore) -> None:
    alice, bob = unique("alice"), unique("bob")
    a1 = SessionRecord(client_id=unique("cid"), owner=alice, subscriptions={"market/#": 1})
    a2 = SessionRecord(client_id=unique("cid"), owner=alice, subscriptions={})
    b1 = SessionRecord(client_id=unique("cid"), owner=bob, subscriptions={"a/+": 0, "b/c": 2})
    for record in (a1, a2, b1):
        await store.save_session(record)

    key = attrgetter("client_id")
    assert sorted(await store.load_sessions(), key=key) == sorted([a1, a2, b1], key=key)
    assert sorted(await store.user_sessions(alice), key=key) == sorted([a1, a2], key=key)
    assert await store.user_sessions(bob) == [b1]
    assert await store.user_sessions(unique("nobody")) == []

    # Saving again overwrites: subscriptions and owner.
    a1_new = SessionRecord(client_id=a1.client_id, owner=bob, subscriptions={"x/y": 2})
    await store.save_session(a1_new)
    assert await store.user_sessions(alice) == [a2]
    assert sorted(await store.user_sessions(bob), key=key) == sorted([a1_new, b1], key=key)

    await store.delete_session(a2.client_id)
    await store.delete_session(unique("never-saved"))
    assert await store.user_sessions(alice) == []
    assert sorted(await store.load_sessions(), key=key) == sorted([a1_new, b1], key=key)


async def test_session_disconnect_time_is_saved_and_set_alone(store: OfflineStore) -> None:
    owner = unique("alice")
    gone_at = 1_733_000_123.456789  # not a round number: must come back exactly
    phone = SessionRecord(unique("cid"), owner, {"market/#": 1}, disconnected_at=gone_at)
    tablet = SessionRecord(unique("cid"), owner, {}, disconnected_at=None)
    await store.save_session(phone)
    await store.save_session(tablet)
    key = attrgetter("client_id")
    assert sorted(await store.user_sessions(owner), key=key) == sorted([phone, tablet], key=key)

    # Saving while connected clears it.
    await store.save_session(replace(phone, disconnected_at=None))
    assert replace(phone, disconnected_at=None) in await store.load_sessions()

    # set_disconnected changes only that field, of sessions that exist, and creates none.
    never_saved = unique("never-saved")
    await store.set_disconnected([phone.client_id, tablet.client_id, never_saved], NOW + 5)
    assert sorted(await store.user_sessions(owner), key=key) == sorted(
        [replace(phone, disconnected_at=NOW + 5), replace(tablet, disconnected_at=NOW + 5)], key=key
    )
    assert never_saved not in {r.client_id for r in await store.load_sessions()}
    await store.set_disconnected([tablet.client_id], None)
    await store.set_disconnected([], NOW + 99)
    assert sorted(await store.user_sessions(owner), key=key) == sorted(
        [replace(phone, disconnected_at=NOW + 5), tablet], key=key
    )
    await store.delete_session(phone.client_id)
    await store.set_disconnected([phone.client_id], NOW + 7)  # deleted: stays deleted
    assert await store.user_sessions(owner) == [tablet]


async def test_orphaned_queue_is_purged_only_once_its_user_owns_no_session(store: OfflineStore) -> None:
    alice, bob = unique("alice"), unique("bob")
    for tag in ("a", "b", "c"):
        await stored(store, alice, msg(tag, size=10))
    kept = await stored(store, bob, msg("bob's", size=5))
    phone = SessionRecord(unique("cid"), alice, {"user/#": 1}, disconnected_at=NOW)
    await store.save_session(phone)
    # Somebody else's session does not keep Alice's queue, nor does Alice's keep Bob's.
    await store.save_session(SessionRecord(unique("cid"), unique("carol"), {}))

    assert await store.purge_orphaned_queue(alice) == 0
    assert await store.queue_size(alice) == (3, 30)

    await store.delete_session(phone.client_id)
    assert await store.purge_orphaned_queue(alice) == 3
    assert await store.queue_size(alice) == (0, 0)
    assert (await store.pending(alice, now=NOW, limit=10)).messages == ()
    assert await store.purge_orphaned_queue(alice) == 0
    assert await store.purge_orphaned_queue(unique("nobody")) == 0
    assert (await store.pending(bob, now=NOW, limit=10)).messages == (kept,)
    assert await store.purge_orphaned_queue(bob) == 1
    # The queue works as new afterwards (its counters were removed with it).
    again = await stored(store, alice, msg("again", size=8))
    assert await store.queue_size(alice) == (1, 8)
    assert (await store.pending(alice, now=NOW, limit=10)).messages == (again,)


async def test_snapshots_upsert_keeps_the_latest(store: OfflineStore) -> None:
    btc, eth = unique("market/luno/BTC-ZAR"), unique("market/valr/ETH-ZAR")
    assert await store.load_snapshots() == []
    await store.save_snapshots([Snapshot(btc, b"\x00one", 1), Snapshot(eth, b"e1", 7)])
    await store.save_snapshots([Snapshot(btc, b"two", 2)])
    await store.save_snapshots([])
    got = sorted(await store.load_snapshots(), key=lambda s: s.topic)
    assert got == sorted([Snapshot(btc, b"two", 2), Snapshot(eth, b"e1", 7)], key=lambda s: s.topic)


# --- seq reservations ----------------------------------------------------------------------

BIG = 2**63 - 1  # a Tick's largest seq: above 2**53, so exact only if compared as integers

# (held before, reserved, at) -> what reserve_seq leaves: the larger reserved and at, never clean.
RESERVE_CASES = [
    (None, (100, 10.0), (100, 10.0)),
    ((100, 10.0, False), (200, 20.0), (200, 20.0)),
    ((300, 10.0, False), (200, 20.0), (300, 20.0)),  # a smaller reservation never lowers it
    ((300, 30.0, False), (400, 20.0), (400, 30.0)),  # a late write never moves `at` back
    ((300, 30.0, False), (200, 20.0), (300, 30.0)),  # a stale write changes nothing
    ((50, 5.0, True), (40, 6.0), (50, 6.0)),  # a clean release is no longer clean
    ((BIG - 1, 1.5, False), (BIG - 2, 1.25), (BIG - 1, 1.5)),
    ((BIG - 2, 1.5, False), (BIG, 1.25), (BIG, 1.5)),
    ((9_007_199_254_740_993, 1.0, False), (9_007_199_254_740_992, 2.0), (9_007_199_254_740_993, 2.0)),
    ((99, 1.0, False), (100, 1.0), (100, 1.0)),  # longer decimal is larger
    ((1000, 1.0, False), (999, 1.0), (1000, 1.0)),
]


@pytest.mark.parametrize(("held", "given", "expected"), RESERVE_CASES)
async def test_reserve_seq_keeps_the_larger_reservation_and_time(
    store: OfflineStore,
    held: tuple[int, float, bool] | None,
    given: tuple[int, float],
    expected: tuple[int, float],
) -> None:
    topic = unique("market/luno/BTC-ZAR")
    if held is not None:
        await store.release_seq([SeqReservation(topic, held[0], held[1])])
        if not held[2]:
            await store.reserve_seq([SeqReservation(topic, held[0], held[1])])
    await store.reserve_seq([SeqReservation(topic, *given)])
    assert await store.load_seq_reservations() == [SeqReservation(topic, *expected, clean=False)]


async def test_seq_reservations_of_many_topics_are_written_together(store: OfflineStore) -> None:
    assert await store.load_seq_reservations() == []
    topics = ["", "market/luno/BTC-ZAR", "market/valr/ETH-ZAR", "market/quidax/USDT-NGN"]
    await store.reserve_seq([SeqReservation(t, 1000 * (i + 1), 100.25) for i, t in enumerate(topics)])
    await store.reserve_seq([SeqReservation(topics[1], 5000, 101.5)])
    await store.reserve_seq([])
    assert await store.load_seq_reservations() == [
        SeqReservation("", 1000, 100.25),
        SeqReservation("market/luno/BTC-ZAR", 5000, 101.5),
        SeqReservation("market/quidax/USDT-NGN", 4000, 100.25),
        SeqReservation("market/valr/ETH-ZAR", 3000, 100.25),
    ]


async def test_release_seq_writes_exactly_and_clean(store: OfflineStore) -> None:
    btc, eth = "market/luno/BTC-ZAR", "market/valr/ETH-ZAR"
    await store.reserve_seq([SeqReservation(btc, 70_000, 50.0), SeqReservation(eth, 80_000, 50.0)])
    # A clean stop lowers the reservation to the last seq handed out (and may move `at` back).
    await store.release_seq([SeqReservation(btc, 4242, 49.0), SeqReservation("", 17, 49.0, clean=False)])
    await store.release_seq([])
    assert await store.load_seq_reservations() == [
        SeqReservation("", 17, 49.0, clean=True),
        SeqReservation(btc, 4242, 49.0, clean=True),
        SeqReservation(eth, 80_000, 50.0, clean=False),
    ]
    await store.reserve_seq([SeqReservation(btc, 4242 + 65_536, 60.0)])
    assert (await store.load_seq_reservations())[1] == SeqReservation(btc, 4242 + 65_536, 60.0)


async def test_user_tz_set_get_clear(store: OfflineStore) -> None:
    user, other, none = unique(), unique(), unique()

    async def zone(who: str) -> str | None:
        return (await store.get_user_tzs([who])).get(who)

    assert await zone(user) is None
    await store.set_user_tz(user, "Africa/Lagos")
    await store.set_user_tz(other, "Africa/Nairobi")
    assert await zone(user) == "Africa/Lagos"
    await store.set_user_tz(user, "Africa/Johannesburg")
    assert await zone(user) == "Africa/Johannesburg"
    # Several users in one call: only those with an override are in the answer.
    assert await store.get_user_tzs([user, none, other, user]) == {
        user: "Africa/Johannesburg",
        other: "Africa/Nairobi",
    }
    assert await store.get_user_tzs([]) == {}
    listing = await store.list_user_tzs(10_000)
    assert listing is not None
    assert {user: "Africa/Johannesburg", other: "Africa/Nairobi"}.items() <= listing.items()
    assert none not in listing
    assert await store.list_user_tzs(1) is None  # more than the limit
    await store.set_user_tz(user, None)
    assert await zone(user) is None
    await store.set_user_tz(user, None)
    assert await zone(other) == "Africa/Nairobi"


async def test_ping(store: OfflineStore) -> None:
    await store.ping()


# --- persistence ---------------------------------------------------------------------------


async def test_everything_survives_reopen(store: OfflineStore, backend: Backend) -> None:
    user = unique()
    urgent = await stored(store, user, msg("urgent", U, size=10))
    low = await stored(store, user, msg("low", L, size=20))
    acked = await stored(store, user, msg("acked", H))
    await store.mark_sent(user, [low.id])
    assert await store.ack(user, acked.id)
    session = SessionRecord(
        client_id=unique("cid"), owner=user, subscriptions={"market/#": 1}, disconnected_at=NOW - 60
    )
    await store.save_session(session)
    snapshot = Snapshot(unique("market/x"), b"tick", 42)
    await store.save_snapshots([snapshot])
    reservations = [SeqReservation("", 65_536, 1.5), SeqReservation(snapshot.topic, 65_578, 2.25)]
    await store.reserve_seq(reservations)
    await store.release_seq([SeqReservation("market/y/A-B", 7, 3.0)])
    await store.set_user_tz(user, "Africa/Cairo")
    await backend.close(store)

    reopened = await backend.open()
    got = await reopened.pending(user, now=NOW, limit=10)
    assert got.messages == (urgent, replace(low, sent=1))
    assert await reopened.queue_size(user) == (2, 30)
    assert await reopened.user_sessions(user) == [session]
    assert snapshot in await reopened.load_snapshots()
    assert await reopened.load_seq_reservations() == [
        *reservations,
        SeqReservation("market/y/A-B", 7, 3.0, clean=True),
    ]
    assert await reopened.get_user_tzs([user]) == {user: "Africa/Cairo"}
    # New ids after reopen do not collide with the old ones (nor with acked ones).
    fresh = await stored(reopened, user, msg("fresh"))
    assert fresh.id not in {urgent.id, low.id, acked.id}
    assert await order(reopened, user) == ["urgent", "fresh", "low"]


# --- group commit --------------------------------------------------------------------------


async def test_enqueue_many_is_enqueue_in_order(store: OfflineStore, backend: Backend) -> None:
    """A group gives what the same enqueues one by one give: order, ids, evictions, refusals."""
    small = await backend.open(QueueLimits(max_messages=3, max_bytes=1000))
    alice, bob = unique(), unique()
    group = [
        (alice, msg("a1", L)),
        (bob, msg("b1", U)),
        (alice, msg("a2", H)),
        (alice, msg("a3", N)),
        (alice, msg("a4", U)),  # full: evicts a1 (LOW)
        (alice, msg("big", U, size=2000)),  # alone over max_bytes: refused
        (bob, msg("b2", N)),
    ]
    results = await small.enqueue_many(group, now=NOW)
    assert [r.stored is not None for r in results] == [True, True, True, True, True, False, True]
    ids = [int(r.stored.id) for r in results if r.stored is not None]
    assert ids == sorted(ids)
    assert [m.topic for m in results[4].evicted] == ["a1"]
    assert results[5].evicted[0].id == ""
    assert results[5].evicted[0].topic == "big"
    assert await order(small, alice) == ["a4", "a2", "a3"]
    assert await order(small, bob) == ["b1", "b2"]
    assert results[1].stored == (await small.pending(bob, now=NOW, limit=1)).messages[0]


async def test_a_refused_message_in_a_group_evicts_nothing(store: OfflineStore, backend: Backend) -> None:
    small = await backend.open(QueueLimits(max_messages=2, max_bytes=1000))
    user = unique()
    results = await small.enqueue_many(
        [(user, msg("u1", U)), (user, msg("u2", U)), (user, msg("l", L))], now=NOW
    )
    assert results[2].stored is None
    assert [m.topic for m in results[2].evicted] == ["l"]
    assert await order(small, user) == ["u1", "u2"]


async def test_an_empty_group_writes_nothing(store: OfflineStore) -> None:
    assert await store.enqueue_many([], now=NOW) == []


async def test_ack_many_removes_what_is_there_and_counts_it(store: OfflineStore) -> None:
    user, other = unique(), unique()
    ids = [(await stored(store, user, msg(f"m{i}"))).id for i in range(5)]
    foreign = (await stored(store, other, msg("theirs"))).id
    assert await store.ack_many(user, [ids[0], ids[2], foreign, "nope"]) == 2
    assert await order(store, user) == ["m1", "m3", "m4"]
    assert await order(store, other) == ["theirs"]  # another user's id is not theirs to ack
    assert await store.ack_many(user, [ids[0]]) == 0
    assert await store.ack_many(user, []) == 0
    assert await store.queue_size(user) == (3, 6)
