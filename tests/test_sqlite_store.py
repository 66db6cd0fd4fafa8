"""SQLite-only behaviour of :class:`~bridge.sqlite_store.SqliteStore` (the shared semantics
are in tests/test_store_contract.py)."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.core.store import NewMessage, Priority, QueueLimits, SessionRecord, Snapshot, StoreError
from bridge.sqlite_store import _MIGRATIONS, SCHEMA_VERSION, SqliteStore

LIMITS = QueueLimits(max_messages=50, max_bytes=64 * 1024)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "offline.sqlite3", LIMITS)
    try:
        yield opened
    finally:
        await opened.close()


def raw(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the file with the plain sqlite3 module, as another process would."""
    with sqlite3.connect(path) as db:
        return list(db.execute(sql))


async def test_file_created_with_parent_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "store.sqlite3"
    store = await SqliteStore.open(path, LIMITS)
    try:
        assert path.is_file()
        await store.set_user_tz("u", "Africa/Accra")
    finally:
        await store.close()
    assert raw(path, "SELECT user, tz FROM user_tz") == [("u", "Africa/Accra")]


async def test_schema_version_wal_and_tables(store: SqliteStore) -> None:
    path = store.path
    assert SCHEMA_VERSION >= 1
    assert raw(path, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert raw(path, "PRAGMA journal_mode") == [("wal",)]
    tables = {row[0] for row in raw(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"messages", "sessions", "snapshots", "user_tz", "schema_version"} <= tables
    indexes = {row[0] for row in raw(path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"messages_delivery", "messages_expiry"} <= indexes


async def test_reopen_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    for _ in range(3):
        store = await SqliteStore.open(path, LIMITS)
        await store.enqueue("u", NewMessage("t", b"x"), now=0.0)
        await store.close()
    assert raw(path, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert raw(path, "SELECT COUNT(*) FROM messages") == [(3,)]


async def test_version_1_file_gains_session_disconnect_times(tmp_path: Path) -> None:
    """A file written before sessions had ``disconnected_at`` opens with it unknown (NULL)."""
    path = tmp_path / "v1.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in _MIGRATIONS[0]:
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (1)")
        db.execute("INSERT INTO sessions VALUES ('phone', 'ann', '{\"a/#\": 1}')")
    store = await SqliteStore.open(path, LIMITS)
    try:
        assert await store.load_sessions() == [
            SessionRecord("phone", "ann", {"a/#": 1}, disconnected_at=None)
        ]
        await store.set_disconnected(["phone"], 12.5)
        assert (await store.user_sessions("ann"))[0].disconnected_at == 12.5
    finally:
        await store.close()
    assert raw(path, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite3"
    await (await SqliteStore.open(path, LIMITS)).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer") as info:
        await SqliteStore.open(path, LIMITS)
    assert str(path) in str(info.value)


async def test_concurrent_enqueues_stay_within_limits(tmp_path: Path) -> None:
    limits = QueueLimits(max_messages=40, max_bytes=1_000_000)
    store = await SqliteStore.open(tmp_path / "busy.sqlite3", limits)
    rng = random.Random(7)
    messages = [
        NewMessage(f"t/{i}", bytes(rng.randrange(1, 200)), priority=Priority(rng.randrange(4)))
        for i in range(200)
    ]
    try:
        results = await asyncio.gather(*(store.enqueue("crowd", m, now=1.0) for m in messages))
        count, size = await store.queue_size("crowd")
        rows = raw(store.path, "SELECT id, size FROM messages WHERE user = 'crowd'")
        survivors = {str(row[0]) for row in rows}

        assert count == limits.max_messages == len(rows)
        assert size == sum(int(str(row[1])) for row in rows)
        assert raw(store.path, "SELECT messages, bytes FROM queue_totals WHERE user = 'crowd'") == [
            (count, size)
        ]
        # Every message is accounted for exactly once: stored then evicted, still queued, or refused.
        stored = {r.stored.id for r in results if r.stored is not None}
        evicted = [m.id for r in results for m in r.evicted if m.id]
        refused = [r for r in results if r.stored is None]
        assert len(evicted) == len(set(evicted))
        assert stored - set(evicted) == survivors
        assert len(stored) + len(refused) == len(messages)
        # The survivors are the highest priorities (ties: the newest arrivals survive).
        kept = sorted(int(str(row[0])) for row in raw(store.path, "SELECT priority FROM messages"))
        lowest_kept = kept[0]
        lost = [m for r in results for m in r.evicted]
        assert all(m.priority <= lowest_kept for m in lost)
        pending = await store.pending("crowd", now=1.0, limit=1000)
        assert {m.id for m in pending.messages} == survivors
    finally:
        await store.close()


async def test_concurrent_operations_of_all_kinds(store: SqliteStore) -> None:
    """Enqueue, pending, ack and mark_sent interleaved from many tasks keep the totals true."""

    async def worker(n: int) -> None:
        user = f"w{n % 5}"
        result = await store.enqueue(user, NewMessage(f"t/{n}", b"p" * (n % 17 + 1)), now=1.0)
        assert result.stored is not None
        await store.mark_sent(user, [result.stored.id])
        pending = await store.pending(user, now=1.0, limit=5)
        if n % 2 and pending.messages:
            await store.ack(user, pending.messages[0].id)

    await asyncio.gather(*(worker(n) for n in range(100)))
    for user in (f"w{i}" for i in range(5)):
        rows = raw(store.path, f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE user = '{user}'")
        assert await store.queue_size(user) == rows[0]


async def test_corrupt_file_raises_store_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.sqlite3"
    path.write_bytes(b"this is not a database, " * 200)
    with pytest.raises(StoreError) as info:
        await SqliteStore.open(path, LIMITS)
    assert str(path) in str(info.value)


async def test_directory_in_the_way_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "is-a-dir"
    path.mkdir()
    with pytest.raises(StoreError) as info:
        await SqliteStore.open(path, LIMITS)
    assert str(path) in str(info.value)


async def test_parent_is_a_file_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    path = blocker / "sub" / "store.sqlite3"
    with pytest.raises(StoreError) as info:
        await SqliteStore.open(path, LIMITS)
    assert str(path) in str(info.value)


async def test_closed_store_raises_store_error(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "closed.sqlite3", LIMITS)
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await store.enqueue("u", NewMessage("t", b"x"), now=0.0)
    with pytest.raises(StoreError, match="closed"):
        await store.ping()
    with pytest.raises(StoreError, match="queue_size"):
        await store.queue_size("u")


async def test_sql_error_is_wrapped_with_the_operation(store: SqliteStore) -> None:
    """A failure inside a transaction rolls back and names the operation."""
    with sqlite3.connect(store.path) as db:
        db.execute("DROP TABLE snapshots")
    with pytest.raises(StoreError, match="save_snapshots"):
        await store.save_snapshots([Snapshot("a", b"1", 1)])
    # The connection is usable afterwards (no transaction left open).
    result = await store.enqueue("u", NewMessage("t", b"x"), now=0.0)
    assert result.stored is not None
