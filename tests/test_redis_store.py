"""Redis-specific behaviour of :class:`bridge.redis_store.RedisStore`, against a real redis-server.

The shared semantics are in tests/test_store_contract.py; here: the key layout, atomicity
under concurrency, the binary encoding, and surviving a Redis restart.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from bridge import redis_keys
from bridge.core.store import (
    NewMessage,
    Priority,
    QueueLimits,
    SeqReservation,
    SessionRecord,
    Snapshot,
    StoreError,
    StoreUnavailable,
)
from bridge.redis_store import RedisStore
from tests.redis_server import RedisProcess

NOW = 1_764_500_000.0
PROMPT_S = 3.0  # an unreachable Redis must be reported within this


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    opened = await RedisStore.open(redis_url, QueueLimits(max_messages=100, max_bytes=64 * 1024))
    yield opened
    await opened.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def msg(payload: bytes = b"x", priority: Priority = Priority.NORMAL, **kwargs: Any) -> NewMessage:
    return NewMessage(
        topic=kwargs.pop("topic", "market/luno/BTC-ZAR"), payload=payload, priority=priority, **kwargs
    )


async def all_keys(client: aioredis.Redis) -> list[str]:
    return sorted([key.decode() async for key in client.scan_iter(count=1000)])


USERS = ["alice", "bob@example.com", "we{ird}", "}{", "%7B", "", "zoë"]


async def test_every_key_has_the_prefix_and_a_users_queue_shares_one_slot(
    store: RedisStore, raw: aioredis.Redis
) -> None:
    for user in USERS:
        await store.enqueue(user, msg(), now=NOW)
        await store.mark_sent(user, [(await store.pending(user, now=NOW, limit=1)).messages[0].id])
        await store.save_session(SessionRecord(client_id=f"c-{user}", owner=user, subscriptions={"a/#": 1}))
        await store.set_user_tz(user, "Africa/Lagos")
    await store.save_snapshots([Snapshot(topic="market/luno/BTC-ZAR", payload=b"{}", seq=7)])
    await store.reserve_seq([SeqReservation("market/luno/BTC-ZAR", 65_543, NOW)])

    found = await all_keys(raw)
    assert found
    assert all(key.startswith(redis_keys.PREFIX) for key in found), found
    for user in USERS:
        queue = redis_keys.queue_keys(user)
        assert set(queue) <= set(found), (user, queue)  # order, msgs, expiry, sent, bytes all in use
        # The orphaned-queue purge runs over the queue and the user's sessions set: one slot.
        together = [*queue, redis_keys.user_sessions(user)]
        assert len({key_slot(key.encode()) for key in together}) == 1, user
    expected_globals = {
        redis_keys.message_seq(),
        redis_keys.sessions_index(),
        redis_keys.snapshots(),
        redis_keys.seq_reservations(),
        redis_keys.user_tz(),
    }
    assert expected_globals <= set(found)
    # Every key in Redis is one that bridge.redis_keys names.
    named = set(expected_globals)
    for user in USERS:
        named |= {
            *redis_keys.queue_keys(user),
            redis_keys.user_sessions(user),
            redis_keys.session(f"c-{user}"),
        }
    assert set(found) == named


def test_hash_tags_keep_distinct_names_distinct() -> None:
    tags = {redis_keys.hash_tag(name) for name in USERS}
    assert len(tags) == len(USERS)
    assert redis_keys.queue_order("alice") == "mb:q:{alice}:order"
    for tag in tags:
        inner = tag[1:-1]
        assert inner
        assert "{" not in inner
        assert "}" not in inner


async def test_concurrent_enqueues_are_atomic(redis_url: str) -> None:
    limits = QueueLimits(max_messages=50, max_bytes=1024 * 1024)
    store = await RedisStore.open(redis_url, limits)
    rng = random.Random(7)
    try:
        messages = [msg(b"p" * rng.randint(1, 300), Priority(rng.randint(0, 3))) for _ in range(200)]
        results = await asyncio.gather(*(store.enqueue("carol", m, now=NOW) for m in messages))
        pending = await store.pending("carol", now=NOW, limit=1000)
        count, total = await store.queue_size("carol")
    finally:
        await store.close()

    assert count == len(pending.messages) == limits.max_messages
    assert total == sum(len(m.payload) for m in pending.messages)
    stored = {r.stored.id for r in results if r.stored is not None}
    evicted = {m.id for r in results for m in r.evicted if m.id}
    assert evicted <= stored
    assert {m.id for m in pending.messages} == stored - evicted


async def test_concurrent_enqueues_respect_the_byte_limit(redis_url: str) -> None:
    limits = QueueLimits(max_messages=1000, max_bytes=4096)
    store = await RedisStore.open(redis_url, limits)
    rng = random.Random(11)
    try:
        messages = [msg(b"b" * rng.randint(1, 500), Priority(rng.randint(0, 3))) for _ in range(200)]
        await asyncio.gather(*(store.enqueue("dave", m, now=NOW) for m in messages))
        pending = await store.pending("dave", now=NOW, limit=1000)
        count, total = await store.queue_size("dave")
    finally:
        await store.close()
    assert count == len(pending.messages)
    assert total == sum(len(m.payload) for m in pending.messages) <= limits.max_bytes


async def test_messages_round_trip_exactly(store: RedisStore) -> None:
    payload = bytes(range(256)) + b"\n \x00 10 20\n"
    created = 1_764_500_000.123456789
    result = await store.enqueue(
        "erin",
        NewMessage(
            topic="alerts/erin/ünïcode\n x", payload=payload, priority=Priority.URGENT, ttl_s=0.1, qos=2
        ),
        now=created,
    )
    assert result.stored is not None
    [got] = (await store.pending("erin", now=created, limit=10)).messages
    assert got == result.stored
    assert (got.payload, got.topic, got.qos, got.created_at, got.expires_at) == (
        payload,
        "alerts/erin/ünïcode\n x",
        2,
        created,
        created + 0.1,
    )
    assert got.id.isdigit()


async def test_expiry_purge_keeps_the_byte_counter(store: RedisStore) -> None:
    await store.enqueue("fay", msg(b"a" * 10, ttl_s=5), now=NOW)
    await store.enqueue("fay", msg(b"b" * 20, ttl_s=50), now=NOW)
    assert await store.queue_size("fay") == (2, 30)
    pending = await store.pending("fay", now=NOW + 5, limit=10)
    assert pending.expired == 1
    assert [m.payload for m in pending.messages] == [b"b" * 20]
    assert await store.queue_size("fay") == (1, 20)
    assert await store.ack("fay", pending.messages[0].id)
    assert await store.queue_size("fay") == (0, 0)


async def test_an_empty_queue_leaves_no_keys(store: RedisStore, raw: aioredis.Redis) -> None:
    result = await store.enqueue("gus", msg(), now=NOW)
    assert result.stored is not None
    await store.mark_sent("gus", [result.stored.id])
    assert await store.ack("gus", result.stored.id)
    assert not set(redis_keys.queue_keys("gus")) & set(await all_keys(raw))


async def test_a_retried_enqueue_script_stores_once(store: RedisStore, raw: aioredis.Redis) -> None:
    """A timeout can hide a success; redis-py then resends the same script with the same id."""
    first = await store.enqueue("hal", msg(b"once"), now=NOW)
    assert first.stored is not None
    encoded = await raw.hget(redis_keys.queue_messages("hal"), first.stored.id)
    assert isinstance(encoded, bytes)
    # The group script's layout: max_messages, max_bytes, the first id, each message's user
    # slot, then the messages encoded.
    args: list[bytes | str | int] = [100, 64 * 1024, first.stored.id, "0", encoded]
    reply = await store._enqueue(keys=redis_keys.queue_keys("hal"), args=args)
    assert reply == [[1]]
    assert await store.queue_size("hal") == (1, 4)


async def test_moving_a_session_updates_both_owners_indexes(store: RedisStore, raw: aioredis.Redis) -> None:
    await store.save_session(SessionRecord(client_id="dev-1", owner="ivy", subscriptions={"x/#": 1}))
    await store.save_session(SessionRecord(client_id="dev-1", owner="jon", subscriptions={"y/#": 0}))
    assert await store.user_sessions("ivy") == []
    assert await raw.smembers(redis_keys.user_sessions("ivy")) == set()
    assert await store.user_sessions("jon") == [SessionRecord("dev-1", "jon", {"y/#": 0})]
    await store.delete_session("dev-1")
    assert await store.load_sessions() == []
    assert await all_keys(raw) == []


async def test_other_redis_errors_are_store_errors(store: RedisStore, raw: aioredis.Redis) -> None:
    await raw.set(redis_keys.queue_order("kim"), "not a sorted set")
    with pytest.raises(StoreError) as caught:
        await store.enqueue("kim", msg(), now=NOW)
    assert not isinstance(caught.value, StoreUnavailable)


async def test_open_fails_promptly_when_redis_is_down(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path)  # never started: nothing listens on its port
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        async with asyncio.timeout(PROMPT_S * 2):
            await RedisStore.open(server.url, QueueLimits())
    assert time.monotonic() - started < PROMPT_S


async def test_invalid_url_is_a_store_error() -> None:
    with pytest.raises(StoreError):
        await RedisStore.open("http://127.0.0.1:1/0", QueueLimits())


async def test_closed_store_refuses_operations(redis_url: str) -> None:
    store = await RedisStore.open(redis_url, QueueLimits())
    await store.close()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreError):
        await store.queue_size("lee")


async def _fails_promptly(operation: Callable[[], Awaitable[object]]) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        async with asyncio.timeout(PROMPT_S * 2):  # a hang fails here, not at the test timeout
            await operation()
    assert time.monotonic() - started < PROMPT_S


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_survives_a_redis_restart(tmp_path: Path, how: str) -> None:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    store: RedisStore | None = None
    try:
        store = await RedisStore.open(server.url, QueueLimits())
        before = [await store.enqueue("max", msg(f"m{i}".encode()), now=NOW) for i in range(3)]
        await store.save_session(SessionRecord(client_id="max-phone", owner="max", subscriptions={"a/b": 1}))
        getattr(server, how)()

        s = store
        await _fails_promptly(s.ping)
        await _fails_promptly(lambda: s.enqueue("max", msg(b"lost"), now=NOW))
        await _fails_promptly(lambda: s.pending("max", now=NOW, limit=10))
        await _fails_promptly(lambda: s.ack("max", "1"))
        await _fails_promptly(lambda: s.mark_sent("max", ["1"]))
        await _fails_promptly(lambda: s.queue_size("max"))
        await _fails_promptly(s.load_sessions)
        await _fails_promptly(lambda: s.save_session(SessionRecord("x", "max")))
        await _fails_promptly(lambda: s.set_user_tz("max", "UTC"))

        server.start()  # same port, same AOF
        pending = await store.pending("max", now=NOW, limit=10)  # same object, not reopened
        assert [m.id for m in pending.messages] == [r.stored.id for r in before if r.stored is not None]
        assert [m.payload for m in pending.messages] == [b"m0", b"m1", b"m2"]
        assert await store.load_sessions() == [SessionRecord("max-phone", "max", {"a/b": 1})]
        after = await store.enqueue("max", msg(b"m3"), now=NOW)
        assert after.stored is not None
        assert int(after.stored.id) > max(int(m.id) for m in pending.messages)
        assert await store.ack("max", pending.messages[0].id)
        assert await store.queue_size("max") == (3, 6)
    finally:
        if store is not None:
            await store.close()
        server.stop()


async def test_scores_order_by_priority_then_arrival(store: RedisStore, raw: aioredis.Redis) -> None:
    ids = {}
    for priority in (Priority.LOW, Priority.URGENT, Priority.NORMAL, Priority.URGENT, Priority.HIGH):
        result = await store.enqueue("nia", msg(priority=priority), now=NOW)
        assert result.stored is not None
        ids[result.stored.id] = priority
    scores = cast(
        "list[tuple[bytes, float]]",
        await raw.zrange(redis_keys.queue_order("nia"), 0, -1, withscores=True),
    )
    for member, score in scores:
        seq = int(member)
        assert score == (3 - ids[member.decode()]) * 2**40 + seq  # exact: below 2**53
    pending = await store.pending("nia", now=NOW, limit=10)
    assert [m.id for m in pending.messages] == [member.decode() for member, _ in scores]
    assert [m.priority for m in pending.messages] == [3, 3, 2, 1, 0]
