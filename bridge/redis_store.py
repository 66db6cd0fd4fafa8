"""The Redis :class:`~bridge.core.store.OfflineStore`: several broker nodes can share one Redis.

Keys are listed (with their types) in :mod:`bridge.redis_keys`.

Offline queue, per user (all its keys share one Redis Cluster hash slot):

- ``order`` sorted set, member = message id, score = ``(3 - priority) * 2**40 + seq``, so
  ZRANGE yields URGENT first and FIFO within a priority. ``seq`` comes from INCR of the
  global ``mb:seq`` counter and the id is ``str(seq)``.
- ``msgs`` hash id -> the encoded message (below), ``expiry`` sorted set id -> expires_at,
  ``sent`` hash id -> deliveries so far (absent means 0), ``bytes`` payload-byte counter.

Every queue change (enqueue with its evictions, pending with its purge of expired messages,
ack, mark_sent) is ONE Lua script over the user's keys only, so a crash never leaves half a
message and the counters always equal what is stored. ``seq`` is taken by a separate INCR
just before the enqueue script (the counter lives outside the user's slot): a crash between
the two only skips a number. Because the id is fixed before the script runs, a retried
enqueue (e.g. after a timeout that hid a success) is recognised and not stored twice.

Encoded message (binary-safe, no base64; the Lua scripts only read the leading size)::

    b"<payload size> <priority> <qos> <created_at!r> <expires_at!r> <topic byte length>\\n"
    + topic (UTF-8) + payload

Expiry: a message is expired when ``expires_at <= now``. ``pending`` removes and counts the
user's expired messages; ``enqueue`` ignores expiry (as the SQLite store does): an expired
message still queued counts towards the limits and may be evicted (and reported) like any.

Eviction: the new message counts. Victims are taken lowest priority first, oldest first,
among messages whose priority is at most the new one's (and, at the same priority, older
than it). If that cannot make room (the new message is of strictly lower priority than
everything that would have to go, or its payload alone exceeds ``max_bytes``) nothing is
removed and the result is ``EnqueueResult(stored=None, evicted=(<the new message, id "">,))``.

Sessions: hash ``mb:session:{cid}`` (``owner``, ``subscriptions`` as JSON, and
``disconnected_at`` unless connected), the set index ``mb:sessions`` and
``mb:user:{user}:sessions``, changed together in MULTI/EXEC (WATCHing the session to find a
previous owner). ``disconnected_at`` alone is set by a one-key script per session (never
creating a half session). Purging a user's queue once they own no session is one script
over their queue keys and ``mb:user:{user}:sessions``, which share the user's hash slot. Snapshots: hash topic -> ``b"<seq>:" + payload``. Time
zones: hash user -> zone. Seq reservations: hash topic -> ``"<reserved> <at> <clean>"``; a
reservation is one script over that hash (it keeps the larger values, compared exactly: as
decimal strings for ``reserved``, which may pass Lua's 2**53), a release one HSET.

Failures: Redis unreachable (connection refused/reset, timeouts, still loading its AOF) ->
:class:`~bridge.core.store.StoreUnavailable`; any other Redis error (e.g. ``OOM`` over
``maxmemory``) -> :class:`~bridge.core.store.StoreError`. Messages name the server by its URL with
the password redacted. The connection pool reconnects by itself, so after Redis comes back
the same store works. Connecting, reading a reply and waiting for a pooled connection each
give up after ``timeout_s`` (``store.call_timeout_s``); a refused or reset connection is
retried twice, a timeout is not (it would only stretch a hang past the caller's deadline).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from bridge import redis_keys as keys
from bridge.config import redact_url
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

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)

PRIORITY_SPAN = 2**40  # seq must stay below this; scores stay below 2**53 (exact in Lua)
TIMEOUT_S = 2.0  # connect, read a reply, wait for a pooled connection (store.call_timeout_s)
RETRIES = 2  # after a refused or reset connection, not after a timeout
HEALTH_CHECK_INTERVAL_S = 15
MAX_CONNECTIONS = 64

# Shared Lua: KEYS = order, msgs, expiry, sent, bytes (bridge.redis_keys.queue_keys).
_LUA_COMMON = """
local order, msgs, expiry, sent, bytes = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

local function size_of(value)
  if not value then return 0 end
  return tonumber(string.match(value, '^(%d+) ')) or 0
end

-- Remove the given ids (all known to be queued) from every key of the queue.
local function remove(ids)
  if #ids == 0 then return end
  local freed = 0
  for i = 1, #ids, 500 do
    local chunk = {}
    for j = i, math.min(i + 499, #ids) do chunk[#chunk + 1] = ids[j] end
    local values = redis.call('HMGET', msgs, unpack(chunk))
    for _, value in ipairs(values) do freed = freed + size_of(value) end
    redis.call('ZREM', order, unpack(chunk))
    redis.call('ZREM', expiry, unpack(chunk))
    redis.call('HDEL', msgs, unpack(chunk))
    redis.call('HDEL', sent, unpack(chunk))
  end
  local left = redis.call('DECRBY', bytes, freed)
  if left <= 0 and redis.call('ZCARD', order) == 0 then redis.call('DEL', bytes) end
end

local function purge_expired(now)
  local ids = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
  remove(ids)
  return #ids
end
"""

# A group of enqueues in one script call (atomic, one round trip, one AOF write). KEYS: the
# queue keys of each user in the group (five each). ARGV: max_messages, max_bytes, the first
# id (the others follow it), the users' slots (0-based, one per message, space-separated),
# then each message encoded (its size, priority and expiry are read from its header).
# Returns per message {0} when it lost, else {1, id1, value1, sent1, ...} for what it
# evicted. An id already stored (a call retried after a dropped connection) is not stored
# again.
_ENQUEUE = (
    _LUA_COMMON
    + """
local SPAN = 1099511627776

local function enqueue_one(id, score, expires_at, size, encoded, max_messages, max_bytes, class)
  if redis.call('HEXISTS', msgs, id) == 1 then return {1} end
  if size > max_bytes then return {0} end
  local count = redis.call('ZCARD', order)
  local total = tonumber(redis.call('GET', bytes) or '0')
  local need_count = count + 1 - max_messages
  local need_bytes = total + size - max_bytes
  local victims, result = {}, {1}
  local c = 3
  while c >= class and (need_count > 0 or need_bytes > 0) do
    local lo = string.format('%.0f', c * SPAN)
    local hi
    if c == class then hi = '(' .. string.format('%.0f', score) else hi = '(' .. string.format('%.0f', (c + 1) * SPAN) end
    local offset = 0
    while need_count > 0 or need_bytes > 0 do
      local ids = redis.call('ZRANGE', order, lo, hi, 'BYSCORE', 'LIMIT', offset, 64)
      if #ids == 0 then break end
      for _, vid in ipairs(ids) do
        local value = redis.call('HGET', msgs, vid)
        victims[#victims + 1] = vid
        result[#result + 1] = vid
        result[#result + 1] = value or ''
        result[#result + 1] = redis.call('HGET', sent, vid) or '0'
        need_count = need_count - 1
        need_bytes = need_bytes - size_of(value)
        if need_count <= 0 and need_bytes <= 0 then break end
      end
      offset = offset + #ids
    end
    c = c - 1
  end
  if need_count > 0 or need_bytes > 0 then return {0} end
  remove(victims)
  redis.call('ZADD', order, string.format('%.0f', score), id)
  redis.call('ZADD', expiry, expires_at, id)
  redis.call('HSET', msgs, id, encoded)
  redis.call('INCRBY', bytes, size)
  return result
end

local max_messages, max_bytes, first = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local a = 5
for slot in string.gmatch(ARGV[4], '%d+') do
  local k = tonumber(slot) * 5
  order, msgs, expiry, sent, bytes = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  local encoded = ARGV[a]
  local size, priority, expires_at = string.match(encoded, '^(%d+) (%d+) %d+ [^ ]+ ([^ ]+) ')
  local class = 3 - tonumber(priority)
  local seq = first + a - 5
  out[#out + 1] = enqueue_one(
    string.format('%.0f', seq), class * SPAN + seq, expires_at, tonumber(size), encoded,
    max_messages, max_bytes, class)
  a = a + 1
end
return out
"""
)

# ARGV: now, limit, excluded ids... Returns {expired, id1, value1, sent1, ...}.
_PENDING = (
    _LUA_COMMON
    + """
local limit = tonumber(ARGV[2])
local result = {purge_expired(ARGV[1])}
if limit <= 0 then return result end
local excluded, n_excluded = {}, 0
for i = 3, #ARGV do
  excluded[ARGV[i]] = true
  n_excluded = n_excluded + 1
end
local ids = redis.call('ZRANGE', order, 0, limit + n_excluded - 1)
local taken = 0
for _, id in ipairs(ids) do
  if taken >= limit then break end
  if not excluded[id] then
    local value = redis.call('HGET', msgs, id)
    if value then
      result[#result + 1] = id
      result[#result + 1] = value
      result[#result + 1] = redis.call('HGET', sent, id) or '0'
      taken = taken + 1
    end
  end
end
return result
"""
)

# ARGV: id. Returns 1 if it was queued (and is now removed), else 0.
_ACK = (
    _LUA_COMMON
    + """
local present = {}
for _, id in ipairs(ARGV) do
  if redis.call('HEXISTS', msgs, id) == 1 then present[#present + 1] = id end
end
if #present > 0 then remove(present) end
return #present
"""
)

# ARGV: ids. Counts one more delivery for each id still queued.
_MARK_SENT = (
    _LUA_COMMON
    + """
for _, id in ipairs(ARGV) do
  if redis.call('HEXISTS', msgs, id) == 1 then redis.call('HINCRBY', sent, id, 1) end
end
return 0
"""
)


# KEYS: queue keys (bridge.redis_keys.queue_keys), then the user's sessions set.
# Deletes the queue unless the user owns a session; returns the number of messages removed.
_PURGE_ORPHANED = """
if redis.call('SCARD', KEYS[6]) > 0 then return 0 end
local count = redis.call('ZCARD', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return count
"""

# KEYS: the queue's order and bytes keys. Read-only, so it answers even when Redis is over
# maxmemory, where a MULTI/EXEC of the same two reads would be refused.
_QUEUE_SIZE = """
return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[2]) or '0')}
"""

# KEYS: one session hash. ARGV: disconnected_at ('' clears it). 1 if the session exists.
_SET_DISCONNECTED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == '' then
  redis.call('HDEL', KEYS[1], 'disconnected_at')
else
  redis.call('HSET', KEYS[1], 'disconnected_at', ARGV[1])
end
return 1
"""

# KEYS: the seq reservations hash. ARGV: topic, reserved, at (repr), ... per topic.
# Keeps the larger reserved and at of what is stored and what is given; clears clean.
_RESERVE_SEQ = """
local function greater(a, b)  -- decimal integers without sign or leading zeros
  if #a ~= #b then return #a > #b end
  return a > b
end
for i = 1, #ARGV, 3 do
  local topic, reserved, at = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local old = redis.call('HGET', KEYS[1], topic)
  if old then
    local old_reserved, old_at = string.match(old, '^(%d+) (%S+) ')
    if old_reserved and greater(old_reserved, reserved) then reserved = old_reserved end
    if old_at and tonumber(old_at) > tonumber(at) then at = old_at end
  end
  redis.call('HSET', KEYS[1], topic, reserved .. ' ' .. at .. ' 0')
end
return 0
"""


def _encode(message: NewMessage, *, created_at: float, expires_at: float) -> bytes:
    topic = message.topic.encode()
    header = (
        f"{len(message.payload)} {int(message.priority)} {message.qos} "
        f"{created_at!r} {expires_at!r} {len(topic)}\n"
    )
    return header.encode() + topic + message.payload


def _decode(message_id: str, user: str, value: bytes, sent: int) -> OfflineMessage:
    header, _, rest = value.partition(b"\n")
    _size, priority, qos, created_at, expires_at, topic_len = header.split(b" ")
    n = int(topic_len)
    return OfflineMessage(
        id=message_id,
        user=user,
        topic=rest[:n].decode(),
        payload=rest[n:],
        priority=Priority(int(priority)),
        qos=int(qos),
        created_at=float(created_at),
        expires_at=float(expires_at),
        sent=sent,
    )


def _refused(user: str, message: NewMessage, now: float) -> EnqueueResult:
    return EnqueueResult(stored=None, evicted=(stored_message("", user, message, now),))


def _triples(user: str, flat: Sequence[Any]) -> tuple[OfflineMessage, ...]:
    """``(id, value, sent)`` triples from a script's flat reply, decoded."""
    return tuple(
        _decode(bytes(flat[i]).decode(), user, bytes(flat[i + 1]), int(flat[i + 2]))
        for i in range(0, len(flat), 3)
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisStore:
    """Offline queues, sessions, snapshots and time zones in Redis; see the module docstring."""

    def __init__(self, client: aioredis.Redis, limits: QueueLimits, *, url: str = "") -> None:
        """Use :meth:`open`, which checks that Redis answers."""
        self.limits = limits
        # How errors name the server: its URL, password redacted.
        self.name = f"redis store {redact_url(url)}" if url else "redis store"
        self._redis = client
        self._closed = False
        self._enqueue = client.register_script(_ENQUEUE)
        self._pending = client.register_script(_PENDING)
        self._ack = client.register_script(_ACK)
        self._mark_sent = client.register_script(_MARK_SENT)
        self._purge_orphaned = client.register_script(_PURGE_ORPHANED)
        self._set_disconnected = client.register_script(_SET_DISCONNECTED)
        self._queue_size = client.register_script(_QUEUE_SIZE)
        self._reserve_seq = client.register_script(_RESERVE_SEQ)

    @classmethod
    async def open(
        cls, url: str, limits: QueueLimits | None = None, *, timeout_s: float = TIMEOUT_S
    ) -> RedisStore:
        """Connect to ``url`` (``redis://``, ``rediss://`` or ``unix://``) and ping it.

        Raises :class:`StoreUnavailable` if Redis does not answer, :class:`StoreError` if the
        URL is invalid. ``timeout_s`` bounds connecting, each reply and the wait for a pooled
        connection.
        """
        try:
            # A bounded pool that makes a burst wait for a connection: the default pool
            # fails outright ("Too many connections") past 100 concurrent commands.
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=MAX_CONNECTIONS,
                timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                retry=Retry(
                    ExponentialWithJitterBackoff(base=0.05, cap=0.5),
                    RETRIES,
                    supported_errors=(redis_errors.ConnectionError,),
                ),
                health_check_interval=HEALTH_CHECK_INTERVAL_S,
                client_name="market-bridge",
            )
            client = aioredis.Redis.from_pool(pool)
        except ValueError as exc:
            raise StoreError(f"invalid redis url {redact_url(url)}: {exc}") from exc
        store = cls(client, limits or QueueLimits(), url=url)
        try:
            await store.ping()
        except BaseException:
            await client.aclose()
            raise
        return store

    @contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        if self._closed:
            error = StoreUnavailable if operation == "ping" else StoreError
            raise error(f"{self.name}: {operation}: the store is closed")
        try:
            yield
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            # BusyLoadingError (Redis replaying its AOF) is a ConnectionError too.
            raise StoreUnavailable(f"{self.name} is unreachable ({operation}): {exc}") from exc
        except redis_errors.RedisError as exc:
            raise StoreError(f"{self.name} failed ({operation}): {exc}") from exc

    async def ping(self) -> None:
        with self._errors("ping"):
            await self._redis.ping()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._redis.aclose()

    # -- offline queue ----------------------------------------------------------------------

    async def enqueue(self, user: str, message: NewMessage, *, now: float) -> EnqueueResult:
        (result,) = await self.enqueue_many([(user, message)], now=now)
        return result

    async def enqueue_many(
        self, messages: Sequence[tuple[str, NewMessage]], *, now: float
    ) -> list[EnqueueResult]:
        """:meth:`enqueue` each (user, message) in order: one ``INCRBY`` for their ids, then
        one script call storing the whole group (atomic, one round trip, one AOF write)."""
        encoded = [
            _encode(message, created_at=now, expires_at=now + message.ttl_s) for _, message in messages
        ]
        # Refused whatever is queued (the script checks too).
        fits = [i for i, (_, message) in enumerate(messages) if len(message.payload) <= self.limits.max_bytes]
        if not fits:
            return [_refused(user, message, now) for user, message in messages]
        with self._errors("enqueue"):
            last = int(await self._redis.incrby(keys.message_seq(), len(fits)))
            if last >= PRIORITY_SPAN:
                raise StoreError(f"message counter {keys.message_seq()} overflowed ({last})")
            first = last - len(fits) + 1
            slots: dict[str, int] = {}
            script_keys: list[str] = []
            order: list[str] = []
            for index in fits:
                user = messages[index][0]
                slot = slots.get(user)
                if slot is None:
                    slot = slots[user] = len(slots)
                    script_keys.extend(keys.queue_keys(user))
                order.append(str(slot))
            args: list[Any] = [self.limits.max_messages, self.limits.max_bytes, first, " ".join(order)]
            args += [encoded[index] for index in fits]
            # One script for the whole group: atomic, one round trip, one AOF write.
            replies = await self._enqueue(keys=script_keys, args=args)
        results: list[EnqueueResult | None] = [None] * len(messages)
        for seq, index, one in zip(range(first, last + 1), fits, replies, strict=True):
            if int(one[0]) == 0:
                continue
            user, message = messages[index]
            stored = stored_message(str(seq), user, message, now)
            results[index] = EnqueueResult(stored, _triples(user, one[1:]) if len(one) > 1 else ())
        return [
            _refused(user, message, now) if result is None else result
            for (user, message), result in zip(messages, results, strict=True)
        ]

    async def pending(self, user: str, *, now: float, limit: int, exclude: Collection[str] = ()) -> Pending:
        with self._errors("pending"):
            reply = await self._pending(keys=keys.queue_keys(user), args=[repr(now), limit, *exclude])
        return Pending(messages=_triples(user, reply[1:]), expired=int(reply[0]))

    async def mark_sent(self, user: str, message_ids: Collection[str]) -> None:
        if not message_ids:
            return
        with self._errors("mark_sent"):
            await self._mark_sent(keys=keys.queue_keys(user), args=list(message_ids))

    async def ack(self, user: str, message_id: str) -> bool:
        return await self.ack_many(user, [message_id]) == 1

    async def ack_many(self, user: str, message_ids: Collection[str]) -> int:
        if not message_ids:
            return 0
        with self._errors("ack"):
            return int(await self._ack(keys=keys.queue_keys(user), args=list(message_ids)))

    async def queue_size(self, user: str) -> tuple[int, int]:
        with self._errors("queue_size"):
            count, total = await self._queue_size(keys=[keys.queue_order(user), keys.queue_bytes(user)])
        return int(count), int(total)

    async def purge_orphaned_queue(self, user: str) -> int:
        with self._errors("purge_orphaned_queue"):
            keys_ = [*keys.queue_keys(user), keys.user_sessions(user)]
            return int(await self._purge_orphaned(keys=keys_))

    # -- sessions ---------------------------------------------------------------------------

    async def save_session(self, record: SessionRecord) -> None:
        key = keys.session(record.client_id)

        async def write(pipe: Pipeline) -> None:
            previous = await pipe.hget(key, "owner")
            pipe.multi()  # type: ignore[no-untyped-call]
            if previous is not None and _text(previous) != record.owner:
                pipe.srem(keys.user_sessions(_text(previous)), record.client_id)
            pipe.hset(
                key,
                mapping={
                    "owner": record.owner,
                    "subscriptions": json.dumps(record.subscriptions, sort_keys=True),
                },
            )
            if record.disconnected_at is None:
                pipe.hdel(key, "disconnected_at")
            else:
                pipe.hset(key, "disconnected_at", repr(record.disconnected_at))
            pipe.sadd(keys.sessions_index(), record.client_id)
            pipe.sadd(keys.user_sessions(record.owner), record.client_id)

        with self._errors("save_session"):
            await self._redis.transaction(write, key)

    async def delete_session(self, client_id: str) -> None:
        key = keys.session(client_id)

        async def delete(pipe: Pipeline) -> None:
            owner = await pipe.hget(key, "owner")
            pipe.multi()  # type: ignore[no-untyped-call]
            if owner is not None:
                pipe.srem(keys.user_sessions(_text(owner)), client_id)
            pipe.delete(key)
            pipe.srem(keys.sessions_index(), client_id)

        with self._errors("delete_session"):
            await self._redis.transaction(delete, key)

    async def set_disconnected(self, client_ids: Collection[str], at: float | None) -> None:
        if not client_ids:
            return
        value = "" if at is None else repr(at)
        with self._errors("set_disconnected"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for client_id in client_ids:
                    # Queued on the pipeline (which loads the script first if Redis lacks it).
                    await self._set_disconnected(keys=[keys.session(client_id)], args=[value], client=pipe)
                await pipe.execute()

    async def _sessions(self, index_key: str, owner: str | None) -> list[SessionRecord]:
        client_ids = sorted(_text(member) for member in await self._redis.smembers(index_key))
        if not client_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for client_id in client_ids:
                pipe.hgetall(keys.session(client_id))
            rows: list[dict[bytes, bytes]] = await pipe.execute()
        records = []
        for client_id, row in zip(client_ids, rows, strict=True):
            if b"owner" not in row:
                continue  # deleted meanwhile
            record = SessionRecord(
                client_id=client_id,
                owner=row[b"owner"].decode(),
                subscriptions={
                    str(k): int(v) for k, v in json.loads(row.get(b"subscriptions", b"{}")).items()
                },
                disconnected_at=float(row[b"disconnected_at"]) if b"disconnected_at" in row else None,
            )
            if owner is None or record.owner == owner:
                records.append(record)
        return records

    async def load_sessions(self) -> list[SessionRecord]:
        with self._errors("load_sessions"):
            return await self._sessions(keys.sessions_index(), None)

    async def user_sessions(self, user: str) -> list[SessionRecord]:
        with self._errors("user_sessions"):
            return await self._sessions(keys.user_sessions(user), user)

    # -- snapshots and time zones -----------------------------------------------------------

    async def save_snapshots(self, snapshots: Collection[Snapshot]) -> None:
        if not snapshots:
            return
        mapping = {s.topic: b"%d:" % s.seq + s.payload for s in snapshots}
        with self._errors("save_snapshots"):
            await self._redis.hset(keys.snapshots(), mapping=mapping)  # type: ignore[arg-type]

    async def load_snapshots(self) -> list[Snapshot]:
        with self._errors("load_snapshots"):
            rows = cast("dict[bytes, bytes]", await self._redis.hgetall(keys.snapshots()))
        snapshots = []
        for topic, value in sorted(rows.items()):
            seq, _, payload = value.partition(b":")
            snapshots.append(Snapshot(topic=topic.decode(), payload=payload, seq=int(seq)))
        return snapshots

    # -- seq reservations -------------------------------------------------------------------

    async def reserve_seq(self, reservations: Collection[SeqReservation]) -> None:
        if not reservations:
            return
        args: list[str | int] = []
        for r in reservations:
            args += [r.topic, r.reserved, repr(float(r.at))]
        with self._errors("reserve_seq"):
            await self._reserve_seq(keys=[keys.seq_reservations()], args=args)

    async def release_seq(self, reservations: Collection[SeqReservation]) -> None:
        if not reservations:
            return
        mapping = {r.topic: f"{r.reserved} {float(r.at)!r} 1" for r in reservations}
        with self._errors("release_seq"):
            await self._redis.hset(keys.seq_reservations(), mapping=mapping)  # type: ignore[arg-type]

    async def load_seq_reservations(self) -> list[SeqReservation]:
        with self._errors("load_seq_reservations"):
            rows = cast("dict[bytes, bytes]", await self._redis.hgetall(keys.seq_reservations()))
        reservations = []
        for topic, value in sorted(rows.items()):
            reserved, at, clean = value.split(b" ")
            reservations.append(SeqReservation(topic.decode(), int(reserved), float(at), clean == b"1"))
        return reservations

    async def set_user_tz(self, user: str, tz: str | None) -> None:
        with self._errors("set_user_tz"):
            if tz is None:
                await self._redis.hdel(keys.user_tz(), user)
            else:
                await self._redis.hset(keys.user_tz(), user, tz)

    async def list_user_tzs(self, limit: int) -> dict[str, str] | None:
        with self._errors("list_user_tzs"):
            if await self._redis.hlen(keys.user_tz()) > limit:
                return None
            listing = await self._redis.hgetall(keys.user_tz())
        if len(listing) > limit:  # grew between the two commands
            return None
        return {_text(user): _text(tz) for user, tz in listing.items()}

    async def get_user_tzs(self, users: Collection[str]) -> dict[str, str]:
        if not users:
            return {}
        names = list(users)
        with self._errors("get_user_tzs"):
            values = await self._redis.hmget(keys.user_tz(), names)
        return {user: _text(value) for user, value in zip(names, values, strict=True) if value is not None}
