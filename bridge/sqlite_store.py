"""The embedded :class:`~bridge.core.store.OfflineStore`: one SQLite file on disk (aiosqlite).

Used when no Redis URL is configured. One connection per store; every operation runs
under one :class:`asyncio.Lock`, and every change is either one statement or one
``BEGIN IMMEDIATE ... COMMIT`` transaction, so concurrent tasks never see (or leave) half a
change. Each statement is one trip to aiosqlite's thread; enqueues go in groups
(:meth:`SqliteStore.enqueue_many`): one function on that thread runs the whole group in one
transaction, so a group costs one trip and one commit. The file uses WAL with ``synchronous=NORMAL``: a committed change survives a process
crash; an OS crash may lose the last transactions but never corrupts the file.

Schema (version in table ``schema_version``; :data:`SCHEMA_VERSION` is what this code
writes, migrations in :data:`_MIGRATIONS` run in order on open):

- ``messages``: one row per queued offline message; the autoincrement ``id`` is the arrival
  order (never reused) and, as a decimal string, the message id.
- ``queue_totals``: (messages, bytes) per user, kept by triggers on ``messages`` so
  :meth:`SqliteStore.queue_size` and the overflow check need no scan.
- ``sessions`` (``disconnected_at`` NULL while connected; added in version 2),
  ``snapshots``, ``user_tz``.
- ``seq_reservations`` (version 3): per market topic (and ``""`` for the others) the seq
  reservation, ``clean`` 1 when written at a clean stop.

All SQL of the SQLite store lives in this module.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import aiosqlite

from bridge.core.store import (
    EnqueueResult,
    NewMessage,
    OfflineMessage,
    Pending,
    Priority,
    QueueLimits,
    SeqReservation,
    SessionRecord,
    Snapshot,
    StoreError,
    StoreUnavailable,
    stored_message,
)

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

BUSY_TIMEOUT_S: Final = 5.0  # waiting for another process's lock on the file

# Each entry upgrades the schema by one version; never edit a shipped entry, append one.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user TEXT NOT NULL,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            priority INTEGER NOT NULL,
            qos INTEGER NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            size INTEGER NOT NULL,
            sent INTEGER NOT NULL DEFAULT 0
        )
        """,
        "CREATE INDEX messages_delivery ON messages (user, priority DESC, id)",
        "CREATE INDEX messages_expiry ON messages (user, expires_at)",
        """
        CREATE TABLE queue_totals (
            user TEXT PRIMARY KEY,
            messages INTEGER NOT NULL,
            bytes INTEGER NOT NULL
        ) WITHOUT ROWID
        """,
        """
        CREATE TRIGGER messages_counted AFTER INSERT ON messages BEGIN
            INSERT INTO queue_totals (user, messages, bytes) VALUES (NEW.user, 1, NEW.size)
            ON CONFLICT (user) DO UPDATE SET messages = messages + 1, bytes = bytes + NEW.size;
        END
        """,
        """
        CREATE TRIGGER messages_uncounted AFTER DELETE ON messages BEGIN
            UPDATE queue_totals SET messages = messages - 1, bytes = bytes - OLD.size
            WHERE user = OLD.user;
            DELETE FROM queue_totals WHERE user = OLD.user AND messages <= 0;
        END
        """,
        """
        CREATE TABLE sessions (
            client_id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            subscriptions TEXT NOT NULL
        )
        """,
        "CREATE INDEX sessions_owner ON sessions (owner)",
        """
        CREATE TABLE snapshots (
            topic TEXT PRIMARY KEY,
            payload BLOB NOT NULL,
            seq INTEGER NOT NULL
        )
        """,
        "CREATE TABLE user_tz (user TEXT PRIMARY KEY, tz TEXT NOT NULL)",
    ),
    ("ALTER TABLE sessions ADD COLUMN disconnected_at REAL",),
    (
        """
        CREATE TABLE seq_reservations (
            topic TEXT PRIMARY KEY,
            reserved INTEGER NOT NULL,
            at REAL NOT NULL,
            clean INTEGER NOT NULL
        ) WITHOUT ROWID
        """,
    ),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)

_MESSAGE_COLUMNS: Final = "id, user, topic, payload, priority, qos, created_at, expires_at, sent"
_SESSION_COLUMNS: Final = "client_id, owner, subscriptions, disconnected_at"

# Insert the new message only if the queue has room for it (check and insert are one
# statement, so atomic). ?1 user ?2 topic ?3 payload ?4 priority ?5 qos ?6 created_at
# ?7 expires_at ?8 size ?9 max_messages ?10 max_bytes. Returns the new id, or no row.
_INSERT_IF_ROOM: Final = """
    INSERT INTO messages (user, topic, payload, priority, qos, created_at, expires_at, size)
    SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8
    WHERE NOT EXISTS (
        SELECT 1 FROM queue_totals WHERE user = ?1 AND (messages + 1 > ?9 OR bytes + ?8 > ?10)
    )
    RETURNING id
"""

# Delete (and return) the shortest prefix, in eviction order (priority, id), of the user's
# messages of priority <= ?2 that makes room for a new message of ?4 bytes under the limits
# (?3 messages, ?5 bytes) -- but no more than ``window`` (messages to free + 16) of them, so
# a full queue costs a few index range reads (one per priority: the delivery index gives
# ids in order within a priority), never a sort of the whole queue. The caller repeats
# until the new message fits or nothing more can go.
_EVICT: Final = f"""
    WITH need AS (
        SELECT messages + 1 - ?3 AS count, bytes + ?4 - ?5 AS bytes,
               MAX(messages + 1 - ?3, 0) + 16 AS window
        FROM queue_totals WHERE user = ?1
    ),
    candidates AS (
        SELECT * FROM (SELECT id FROM messages WHERE user = ?1 AND priority = 0 AND ?2 >= 0
                       ORDER BY id LIMIT (SELECT window FROM need))
        UNION ALL
        SELECT * FROM (SELECT id FROM messages WHERE user = ?1 AND priority = 1 AND ?2 >= 1
                       ORDER BY id LIMIT (SELECT window FROM need))
        UNION ALL
        SELECT * FROM (SELECT id FROM messages WHERE user = ?1 AND priority = 2 AND ?2 >= 2
                       ORDER BY id LIMIT (SELECT window FROM need))
        UNION ALL
        SELECT * FROM (SELECT id FROM messages WHERE user = ?1 AND priority = 3 AND ?2 >= 3
                       ORDER BY id LIMIT (SELECT window FROM need))
    )
    DELETE FROM messages WHERE id IN (
        SELECT id FROM (
            SELECT id,
                   ROW_NUMBER() OVER queue AS n,
                   SUM(size) OVER queue - size AS freed_before
            FROM messages WHERE id IN candidates
            WINDOW queue AS (ORDER BY priority, id)
        )
        WHERE (n <= (SELECT count FROM need) OR freed_before < (SELECT bytes FROM need))
          AND n <= (SELECT window FROM need)
    )
    RETURNING {_MESSAGE_COLUMNS}
"""
assert len(Priority) == 4, "_EVICT has one candidate range per priority"


def _enqueue_group(
    conn: sqlite3.Connection, work: Sequence[tuple[tuple[Any, ...], tuple[Any, ...]] | None]
) -> list[tuple[int, list[Any]] | None]:
    """On the connection's thread: each (insert, evict) parameter pair in one ``BEGIN
    IMMEDIATE`` transaction; per message its row id and the rows evicted for it, or None if
    it was refused (a savepoint undoes what was evicted for it). All or nothing."""
    outcomes: list[tuple[int, list[Any]] | None] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for item in work:
            if item is None:
                outcomes.append(None)
                continue
            insert, evict = item
            inserted = conn.execute(_INSERT_IF_ROOM, insert).fetchall()
            victims: list[Any] = []
            if not inserted:
                conn.execute("SAVEPOINT make_room")
                while not inserted:
                    evicted = conn.execute(_EVICT, evict).fetchall()
                    if not evicted:
                        break  # the new message itself is the victim
                    victims.extend(evicted)
                    inserted = conn.execute(_INSERT_IF_ROOM, insert).fetchall()
                if not inserted:
                    conn.execute("ROLLBACK TO make_room")
                conn.execute("RELEASE make_room")
            outcomes.append((int(inserted[0][0]), victims) if inserted else None)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    return outcomes


def _message(row: Sequence[Any]) -> OfflineMessage:
    return OfflineMessage(
        id=str(row[0]),
        user=row[1],
        topic=row[2],
        payload=bytes(row[3]),
        priority=Priority(row[4]),
        qos=row[5],
        created_at=row[6],
        expires_at=row[7],
        sent=row[8],
    )


def _row_id(message_id: str) -> int | None:
    """The row id a message id names, or None for an id this store never gave out."""
    if message_id.isascii() and message_id.isdigit() and len(message_id) <= 18:
        return int(message_id)
    return None


def _row_ids(message_ids: Iterable[str]) -> str:
    """A JSON array of the row ids among ``message_ids`` (foreign ids match nothing)."""
    return json.dumps([i for i in map(_row_id, message_ids) if i is not None])


class SqliteStore:
    """:class:`~bridge.core.store.OfflineStore` on one SQLite file; see the module docstring."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: Path,
        limits: QueueLimits,
        *,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        """Use :meth:`open`."""
        self._db: aiosqlite.Connection | None = db
        self.path = path
        self.limits = limits
        self.busy_timeout_s = busy_timeout_s
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, path: Path, limits: QueueLimits, *, busy_timeout_s: float = BUSY_TIMEOUT_S
    ) -> SqliteStore:
        """Open (creating it and its directories if needed) and migrate the store at ``path``.

        ``busy_timeout_s``: how long a statement waits for another process's lock on the file
        (e.g. ``market-bridge tz --set`` while the broker runs) before failing.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"sqlite store {path}: cannot create its directory: {exc}") from exc
        try:
            # Probe first: when aiosqlite's own connect fails, its worker thread outlives the
            # call and may report to an event loop that is already closed.
            await asyncio.to_thread(_probe, path)
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {path}: cannot open: {exc}") from exc
        store = cls(db, path, limits, busy_timeout_s=busy_timeout_s)
        try:
            await store._setup()
        except BaseException:
            await store.close()
            raise
        return store

    async def _setup(self) -> None:
        db = self._conn("open")
        try:
            await db.execute(f"PRAGMA busy_timeout = {round(self.busy_timeout_s * 1000)}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.path}: cannot open: {exc}") from exc
        async with self._transaction("migrate") as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = await _one(tx, "SELECT MAX(version) FROM schema_version")
            current = 0 if row is None or row[0] is None else int(row[0])
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"sqlite store {self.path}: schema version {current} is newer than this "
                    f"version of market-bridge understands ({SCHEMA_VERSION})"
                )
            for statements in _MIGRATIONS[current:]:
                for statement in statements:
                    await tx.execute(statement)
            if current < SCHEMA_VERSION:
                await tx.execute("DELETE FROM schema_version")
                await tx.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def _conn(self, operation: str) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError(f"sqlite store {self.path}: {operation}: the store is closed")
        return self._db

    @asynccontextmanager
    async def _locked(self, operation: str) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, alone (other tasks wait); sqlite errors become :class:`StoreError`."""
        async with self._lock:
            db = self._conn(operation)
            try:
                yield db
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store {self.path}: {operation} failed: {exc}") from exc

    @asynccontextmanager
    async def _transaction(self, operation: str) -> AsyncIterator[aiosqlite.Connection]:
        """:meth:`_locked` inside one ``BEGIN IMMEDIATE`` transaction."""
        async with self._locked(operation) as db, _atomic(db):
            yield db

    async def ping(self) -> None:
        if self._db is None:
            raise StoreUnavailable(f"sqlite store {self.path}: the store is closed")
        try:
            async with self._locked("ping") as db:
                await _one(db, "SELECT 1")
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def enqueue(self, user: str, message: NewMessage, *, now: float) -> EnqueueResult:
        """Queue ``message`` for ``user``, evicting to stay within :attr:`limits`; atomic.

        Eviction order is (priority ascending, arrival ascending) over the queued messages
        *and* the new one, which is the newest: victims are taken in that order until the
        queue (with the new message) is within ``max_messages`` and ``max_bytes``. Expiry
        plays no part here (expired messages are removed by :meth:`pending`).

        Refusal convention (the contract tests pin it for every store): when the new message
        itself would be a victim -- every message that could make room is of strictly higher
        priority, or its payload alone exceeds ``max_bytes`` -- nothing is changed and the
        result is ``EnqueueResult(stored=None, evicted=(refused,))`` where ``refused`` is the
        new message as an :class:`OfflineMessage` with ``id=""``, this ``user``,
        ``created_at=now``, ``expires_at=now + ttl_s`` and ``sent=0``. No queued message is
        evicted for a message that is then refused.

        Otherwise ``stored`` is the queued message and ``evicted`` the removed ones, in
        eviction order (lowest priority, oldest first).
        """
        (result,) = await self.enqueue_many([(user, message)], now=now)
        return result

    async def enqueue_many(
        self, messages: Sequence[tuple[str, NewMessage]], *, now: float
    ) -> list[EnqueueResult]:
        """:meth:`enqueue` each (user, message) in order, all in one transaction: one trip to
        the connection's thread and one commit (one WAL sync point) for the whole group."""
        limits = self.limits
        expires = [now + message.ttl_s for _, message in messages]
        work: list[tuple[tuple[Any, ...], tuple[Any, ...]] | None] = []
        for (user, message), expires_at in zip(messages, expires, strict=True):
            size = len(message.payload)
            if size > limits.max_bytes:
                work.append(None)  # refused whatever is queued
                continue
            insert = (
                user,
                message.topic,
                message.payload,
                int(message.priority),
                message.qos,
                now,
                expires_at,
                size,
                limits.max_messages,
                limits.max_bytes,
            )
            work.append((insert, (user, int(message.priority), limits.max_messages, size, limits.max_bytes)))
        async with self._locked("enqueue") as db:
            # One function on aiosqlite's thread for the whole group (its own helpers do the
            # same): a statement per trip would cost a thread hand-off per message.
            outcomes: list[tuple[int, list[Any]] | None] = await db._execute(  # type: ignore[no-untyped-call]
                _enqueue_group, db._conn, work
            )
        results = []
        for (user, message), outcome in zip(messages, outcomes, strict=True):
            if outcome is None:
                results.append(EnqueueResult(stored=None, evicted=(stored_message("", user, message, now),)))
                continue
            row_id, evicted = outcome
            victims = sorted(map(_message, evicted), key=lambda m: (m.priority, int(m.id))) if evicted else ()
            results.append(EnqueueResult(stored_message(str(row_id), user, message, now), tuple(victims)))
        return results

    async def pending(self, user: str, *, now: float, limit: int, exclude: Collection[str] = ()) -> Pending:
        """Remove ``user``'s expired messages (``expires_at <= now``), then up to ``limit`` others.

        Order: priority descending, arrival ascending; ids in ``exclude`` are skipped. If the
        file cannot be written (full disk, read-only), the expired ones are only skipped
        (``expired`` 0): what is stored can still be delivered.
        """
        async with self._locked("pending") as db:
            try:
                expired = await _changes(
                    db, "DELETE FROM messages WHERE user = ? AND expires_at <= ?", (user, now)
                )
            except sqlite3.Error:
                expired = 0  # the next pending that can write removes (and counts) them
            rows = await db.execute_fetchall(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages"
                " WHERE user = ? AND expires_at > ? AND id NOT IN (SELECT value FROM json_each(?))"
                " ORDER BY priority DESC, id LIMIT ?",
                (user, now, _row_ids(exclude), max(limit, 0)),
            )
        return Pending(messages=tuple(_message(row) for row in rows), expired=max(expired, 0))

    async def mark_sent(self, user: str, message_ids: Collection[str]) -> None:
        if not message_ids:
            return
        async with self._locked("mark_sent") as db:
            await db.execute(
                "UPDATE messages SET sent = sent + 1"
                " WHERE user = ? AND id IN (SELECT value FROM json_each(?))",
                (user, _row_ids(message_ids)),
            )

    async def ack(self, user: str, message_id: str) -> bool:
        row_id = _row_id(message_id)
        if row_id is None:
            return False
        async with self._locked("ack") as db:
            return await _changes(db, "DELETE FROM messages WHERE user = ? AND id = ?", (user, row_id)) > 0

    async def ack_many(self, user: str, message_ids: Collection[str]) -> int:
        if not message_ids:
            return 0
        async with self._locked("ack") as db:
            return await _changes(
                db,
                "DELETE FROM messages WHERE user = ? AND id IN (SELECT value FROM json_each(?))",
                (user, _row_ids(message_ids)),
            )

    async def queue_size(self, user: str) -> tuple[int, int]:
        async with self._locked("queue_size") as db:
            row = await _one(db, "SELECT messages, bytes FROM queue_totals WHERE user = ?", (user,))
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    async def save_session(self, record: SessionRecord) -> None:
        async with self._locked("save_session") as db:
            await db.execute(
                "INSERT INTO sessions (client_id, owner, subscriptions, disconnected_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (client_id) DO UPDATE"
                " SET owner = excluded.owner, subscriptions = excluded.subscriptions,"
                " disconnected_at = excluded.disconnected_at",
                (
                    record.client_id,
                    record.owner,
                    json.dumps(record.subscriptions, sort_keys=True),
                    record.disconnected_at,
                ),
            )

    async def delete_session(self, client_id: str) -> None:
        async with self._locked("delete_session") as db:
            await db.execute("DELETE FROM sessions WHERE client_id = ?", (client_id,))

    async def set_disconnected(self, client_ids: Collection[str], at: float | None) -> None:
        if not client_ids:
            return
        async with self._locked("set_disconnected") as db:
            await db.execute(
                "UPDATE sessions SET disconnected_at = ? WHERE client_id IN (SELECT value FROM json_each(?))",
                (at, json.dumps(list(client_ids))),
            )

    async def purge_orphaned_queue(self, user: str) -> int:
        async with self._locked("purge_orphaned_queue") as db:
            return await _changes(
                db,
                "DELETE FROM messages WHERE user = ?1 AND NOT EXISTS (SELECT 1 FROM sessions WHERE owner = ?1)",
                (user,),
            )

    async def load_sessions(self) -> list[SessionRecord]:
        async with self._locked("load_sessions") as db:
            rows = await db.execute_fetchall(f"SELECT {_SESSION_COLUMNS} FROM sessions ORDER BY client_id")
        return [_session(row) for row in rows]

    async def user_sessions(self, user: str) -> list[SessionRecord]:
        async with self._locked("user_sessions") as db:
            rows = await db.execute_fetchall(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE owner = ? ORDER BY client_id",
                (user,),
            )
        return [_session(row) for row in rows]

    async def save_snapshots(self, snapshots: Collection[Snapshot]) -> None:
        if not snapshots:
            return
        async with self._transaction("save_snapshots") as db:
            await db.executemany(
                "INSERT INTO snapshots (topic, payload, seq) VALUES (?, ?, ?)"
                " ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload, seq = excluded.seq",
                [(s.topic, s.payload, s.seq) for s in snapshots],
            )

    async def load_snapshots(self) -> list[Snapshot]:
        async with self._locked("load_snapshots") as db:
            rows = await db.execute_fetchall("SELECT topic, payload, seq FROM snapshots ORDER BY topic")
        return [Snapshot(topic=row[0], payload=bytes(row[1]), seq=int(row[2])) for row in rows]

    async def reserve_seq(self, reservations: Collection[SeqReservation]) -> None:
        if not reservations:
            return
        async with self._transaction("reserve_seq") as db:
            await db.executemany(
                "INSERT INTO seq_reservations (topic, reserved, at, clean) VALUES (?, ?, ?, 0)"
                " ON CONFLICT (topic) DO UPDATE SET reserved = MAX(reserved, excluded.reserved),"
                " at = MAX(at, excluded.at), clean = 0",
                [(r.topic, r.reserved, r.at) for r in reservations],
            )

    async def release_seq(self, reservations: Collection[SeqReservation]) -> None:
        if not reservations:
            return
        async with self._transaction("release_seq") as db:
            await db.executemany(
                "INSERT INTO seq_reservations (topic, reserved, at, clean) VALUES (?, ?, ?, 1)"
                " ON CONFLICT (topic) DO UPDATE SET reserved = excluded.reserved, at = excluded.at, clean = 1",
                [(r.topic, r.reserved, r.at) for r in reservations],
            )

    async def load_seq_reservations(self) -> list[SeqReservation]:
        async with self._locked("load_seq_reservations") as db:
            rows = await db.execute_fetchall(
                "SELECT topic, reserved, at, clean FROM seq_reservations ORDER BY topic"
            )
        return [SeqReservation(str(r[0]), int(r[1]), float(r[2]), bool(r[3])) for r in rows]

    async def set_user_tz(self, user: str, tz: str | None) -> None:
        async with self._locked("set_user_tz") as db:
            if tz is None:
                await db.execute("DELETE FROM user_tz WHERE user = ?", (user,))
            else:
                await db.execute(
                    "INSERT INTO user_tz (user, tz) VALUES (?, ?)"
                    " ON CONFLICT (user) DO UPDATE SET tz = excluded.tz",
                    (user, tz),
                )

    async def get_user_tzs(self, users: Collection[str]) -> dict[str, str]:
        if not users:
            return {}
        async with self._locked("get_user_tzs") as db:
            rows = await db.execute_fetchall(
                "SELECT user, tz FROM user_tz WHERE user IN (SELECT value FROM json_each(?))",
                (json.dumps(list(users)),),
            )
        return {str(row[0]): str(row[1]) for row in rows}

    async def list_user_tzs(self, limit: int) -> dict[str, str] | None:
        async with self._locked("list_user_tzs") as db:
            rows = list(await db.execute_fetchall("SELECT user, tz FROM user_tz LIMIT ?", (limit + 1,)))
        if len(rows) > limit:
            return None
        return {str(row[0]): str(row[1]) for row in rows}

    async def close(self) -> None:
        """Close the connection (idempotent); later operations raise :class:`StoreError`."""
        async with self._lock:
            db, self._db = self._db, None
            if db is not None:
                try:
                    await db.close()
                except sqlite3.Error as exc:
                    raise StoreError(f"sqlite store {self.path}: close failed: {exc}") from exc


@asynccontextmanager
async def _atomic(db: aiosqlite.Connection) -> AsyncIterator[None]:
    """One ``BEGIN IMMEDIATE`` transaction: committed at the end, rolled back on any error.

    A rollback is queued on the connection's thread as soon as it is awaited, before any
    later statement, so it runs even if this task is cancelled again while waiting.
    """
    await db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        await db.rollback()
        raise
    try:
        await db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            await db.rollback()
        raise


def _probe(path: Path) -> None:
    sqlite3.connect(path).close()


async def _one(db: aiosqlite.Connection, sql: str, parameters: Sequence[Any] = ()) -> sqlite3.Row | None:
    """The first row (one trip to the connection's thread)."""
    rows = list(await db.execute_fetchall(sql, parameters))
    return rows[0] if rows else None


async def _changes(db: aiosqlite.Connection, sql: str, parameters: Sequence[Any]) -> int:
    """Run one data-changing statement; the number of rows it changed (one trip)."""
    cursor = await db.execute(sql, parameters)
    return max(cursor.rowcount, 0)


def _session(row: Sequence[Any]) -> SessionRecord:
    subscriptions = json.loads(row[2])
    return SessionRecord(
        client_id=row[0],
        owner=row[1],
        subscriptions={str(k): int(v) for k, v in subscriptions.items()},
        disconnected_at=None if row[3] is None else float(row[3]),
    )
