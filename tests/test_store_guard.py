"""bridge.store_guard: a deadline on every store call, and refused calls remembered.

Against real stores in real trouble: a SIGSTOPped redis-server (connections open, nothing
answered), an SQLite file locked by another connection, a store that cannot grow.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from bridge.config import StoreConfig
from bridge.core.store import (
    NewMessage,
    OfflineStore,
    QueueLimits,
    SessionRecord,
    Snapshot,
    StoreError,
    StoreUnavailable,
)
from bridge.redis_store import RedisStore
from bridge.sqlite_store import SqliteStore
from bridge.store_guard import FAILURE_HOLD_S, GuardedStore
from broker_plugins.offline_store import open_store
from tests.redis_server import RedisProcess
from tests.store_faults import set_fault

NOW = 1_764_500_000.0
MARGIN_S = 0.5  # scheduling slack on a busy 2-core machine, on top of a deadline
CALL_S, QUICK_S = 0.8, 0.2

Call = Callable[[GuardedStore], Awaitable[object]]
# Every call of the contract; True for the two on a hot path (the quick deadline).
CALLS: dict[str, tuple[bool, Call]] = {
    "ping": (True, lambda s: s.ping()),
    "get_user_tzs": (True, lambda s: s.get_user_tzs(["kim", "lee"])),
    "enqueue": (False, lambda s: s.enqueue("kim", NewMessage("user/kim/a", b"x"), now=NOW)),
    "pending": (False, lambda s: s.pending("kim", now=NOW, limit=10)),
    "mark_sent": (False, lambda s: s.mark_sent("kim", ["1"])),
    "ack": (False, lambda s: s.ack("kim", "1")),
    "queue_size": (False, lambda s: s.queue_size("kim")),
    "save_session": (False, lambda s: s.save_session(SessionRecord("kim-phone", "kim"))),
    "delete_session": (False, lambda s: s.delete_session("kim-tablet")),
    "set_disconnected": (False, lambda s: s.set_disconnected(["kim-phone"], NOW)),
    "purge_orphaned_queue": (False, lambda s: s.purge_orphaned_queue("lee")),
    "load_sessions": (False, lambda s: s.load_sessions()),
    "user_sessions": (False, lambda s: s.user_sessions("kim")),
    "save_snapshots": (False, lambda s: s.save_snapshots([Snapshot("market/luno/BTC-ZAR", b"{}", 1)])),
    "load_snapshots": (False, lambda s: s.load_snapshots()),
    "set_user_tz": (False, lambda s: s.set_user_tz("kim", "Africa/Lagos")),
    "list_user_tzs": (False, lambda s: s.list_user_tzs(100)),
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _timed(call: Awaitable[object]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await call
    except StoreError as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


@pytest.fixture
async def hung_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis", password="hunter2-secret")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_every_call_to_a_hung_redis_fails_within_its_deadline(hung_redis: RedisProcess) -> None:
    config = StoreConfig(redis_url=hung_redis.url, call_timeout_s=CALL_S, quick_timeout_s=QUICK_S)
    store = await open_store(config)
    try:
        await store.save_session(SessionRecord("kim-phone", "kim", {"user/kim/#": 1}))
        with hung_redis.paused():
            # All at once: each call keeps its own deadline whatever else waits.
            names = list(CALLS)
            results = await asyncio.gather(*(_timed(CALLS[name][1](store)) for name in names))
        for name, (elapsed, exc) in zip(names, results, strict=True):
            quick, _ = CALLS[name]
            deadline = QUICK_S if quick else CALL_S
            print(f"hung redis: {name} gave up after {elapsed:.2f}s (deadline {deadline}s)")
            assert isinstance(exc, StoreUnavailable), (name, exc)
            assert elapsed < deadline + MARGIN_S, (name, elapsed)
            assert f"did not answer {name} within {deadline:g}s" in str(exc)
            # The server is named by its URL, the password redacted.
            assert "redis://:***@127.0.0.1" in str(exc)
            assert "hunter2" not in str(exc)
        assert store.timeouts == len(CALLS)
        assert store.failure() is None  # nothing refused: it did not answer

        # Answering again: the same store object works, nothing reopened. The calls given up
        # on end by themselves (some may have landed: at-least-once).
        assert await store.settle(10.0)
        await store.ping()
        stored = await store.enqueue("kim", NewMessage("user/kim/a", b"after"), now=NOW)
        assert stored.stored is not None
        pending = await store.pending("kim", now=NOW, limit=10)
        assert pending.messages[-1].payload == b"after"
    finally:
        started = time.monotonic()
        await store.close()
    assert time.monotonic() - started < CALL_S * 2 + MARGIN_S


async def test_a_call_past_its_deadline_runs_to_its_end(tmp_path: Path) -> None:
    """The caller stops waiting, the store does not stop half way: the write lands later
    (at-least-once), and calls behind it wait their own deadlines."""
    path = tmp_path / "locked.sqlite3"
    inner = await SqliteStore.open(path, QueueLimits(), busy_timeout_s=10)
    store = GuardedStore(inner, name=f"sqlite store {path}", call_timeout_s=0.3, quick_timeout_s=0.1)
    other = sqlite3.connect(path, isolation_level=None)  # e.g. `market-bridge tz --set` mid-write
    try:
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreUnavailable, match=r"did not answer enqueue within 0\.3s"):
                await store.enqueue("kim", NewMessage("user/kim/a", b"late"), now=NOW)
            assert store.in_flight == 1
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"did not answer ping within 0\.1s"):
                await store.ping()  # queued behind the enqueue, which holds the store
            assert time.monotonic() - started < 0.1 + MARGIN_S
        finally:
            other.execute("COMMIT")
        assert await store.settle(10.0)
        assert await store.queue_size("kim") == (1, 4)
        assert [m.payload for m in (await store.pending("kim", now=NOW, limit=10)).messages] == [b"late"]
        assert store.failure() is None
    finally:
        other.close()
        await store.close()


@pytest.fixture(params=["embedded", "redis"])
async def plain_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OfflineStore]:
    store: OfflineStore
    if request.param == "redis":
        store = await RedisStore.open(request.getfixturevalue("redis_url"), QueueLimits())
    else:
        store = await SqliteStore.open(tmp_path / "full.sqlite3", QueueLimits())
    try:
        yield store
    finally:
        await set_fault(store, None)  # the session's redis-server is shared
        await store.close()


async def test_a_refused_call_is_reported_for_a_while(plain_store: OfflineStore) -> None:
    clock = Clock()
    store = GuardedStore(plain_store, clock=clock)
    for i in range(5):
        await store.enqueue("kim", NewMessage("user/kim/a", b"m%d" % i), now=NOW)
    assert store.failure() is None
    await set_fault(store, "full")

    big = NewMessage("user/kim/a", b"x" * 8192)  # needs new pages: refused by a full store
    with pytest.raises(StoreError) as refused:
        await store.enqueue("kim", big, now=NOW)
    assert not isinstance(refused.value, StoreUnavailable)
    failure = store.failure()
    assert failure is not None
    assert failure.operation == "enqueue"
    assert ("database or disk is full" in failure.error) or ("maxmemory" in failure.error), failure.error
    assert store.failures == 1

    # Reads and pings still work, and do not make it forget ...
    await store.ping()
    pending = await store.pending("kim", now=NOW, limit=10)
    assert [m.payload for m in pending.messages] == [b"m%d" % i for i in range(5)]
    clock.now += FAILURE_HOLD_S - 1
    assert store.failure() == failure
    # ... until it has been quiet for FAILURE_HOLD_S.
    clock.now += 1
    assert store.failure() is None

    await set_fault(store, None)
    assert (await store.enqueue("kim", big, now=NOW)).stored is not None
    assert store.failure() is None
