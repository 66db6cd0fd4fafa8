"""One ``seq`` per topic for the whole cluster, and the shared retained snapshots.

The choice: an atomic counter per topic in Redis, assigned by the same Lua script that stores
the snapshot and publishes the batch (:data:`STAMP`). A partition's counter hash, snapshot hash
and channel share one hash tag (``{mb:p7}``), so they live on one shard and the script touches
one slot. Two nodes publishing the same topic therefore get distinct, strictly increasing
numbers, and because the number is taken and the batch published in one atomic step, every
subscriber receives a topic's ticks in ``seq`` order (a shard's pub/sub keeps publish order).
Cost: one round trip per partition per batch (not per tick); inside it five commands
whatever the batch holds: one HMGET each for the topics' counters and snapshots, one HSET
each to move them, and the SPUBLISH.

Snapshots (latest tick per topic, ``b"<seq>:" + payload``) are written with their seq and never
replaced by an older one (:data:`PUT_SNAPSHOTS` compares; :data:`STAMP` only ever writes the
newest number). A restarting node reads them all at once (:meth:`SeqLedger.snapshots`).

Interface::

    ledger = SeqLedger(backbone.redis)
    seqs = await ledger.stamp(partition, node_id, [(topic, payload), ...])   # also SPUBLISHes
    await ledger.put_snapshots(partition, [Snapshot(...)])                    # compare-and-set
    await ledger.snapshots(range(partitions))                                 # -> [Snapshot]

``stamp`` and ``put_snapshots`` raise redis-py's errors (the bus translates them);
``snapshots`` raises :class:`~bridge.errors.ClusterUnavailable` (a start-up read).

Persistence: Redis replicates asynchronously. A clean ``CLUSTER FAILOVER`` waits for the
replica to catch up (nothing lost); a master that dies can take its last unreplicated writes
with it, and then its counters restart from what the replica had. The stamp script never
hands out a number at or below the topic's stored snapshot, which bounds the damage, but a
seq can repeat after such a crash (the replica lags by milliseconds): that is the trade-off
of asynchronous replication (``WAIT`` per batch would cost a replica round trip per tick).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster

from bridge import redis_keys as keys
from bridge.cluster.backbone import unavailable_as
from bridge.core.store import Snapshot

__all__ = ["PUT_SNAPSHOTS", "STAMP", "SeqLedger", "decode_snapshot", "encode_snapshot"]

# Batch encoding shared with bridge.cluster.bus.decode_batch: "MB1" then netstrings
# ("<len>:<bytes>"): the node id, then per tick its topic, seq (decimal) and payload.
#
# KEYS: seq hash, snapshot hash. ARGV: channel, node id, then topic, payload, topic, payload...
# Returns the seqs, in order.
STAMP = """
local seqkey, snapkey = KEYS[1], KEYS[2]
local function ns(s) return #s .. ':' .. s end
-- Ticks per topic first.
local count, order = {}, {}
for i = 3, #ARGV, 2 do
  local topic = ARGV[i]
  if count[topic] == nil then
    count[topic] = 0
    order[#order + 1] = topic
  end
  count[topic] = count[topic] + 1
end
-- Every counter and snapshot of the batch's topics read in one HMGET each, written in one
-- HSET each: five commands per batch whatever it holds (Redis operations per tick stay low).
if #order == 0 then
  redis.call('SPUBLISH', ARGV[1], 'MB1' .. ns(ARGV[2]))
  return {}
end
local counters = redis.call('HMGET', seqkey, unpack(order))
local held = redis.call('HMGET', snapkey, unpack(order))
local nextseq, moved = {}, {}
for k, topic in ipairs(order) do
  local base = counters[k] and tonumber(counters[k]) or 0
  -- Never below what the snapshot holds (its counter may have been lost in a failover
  -- while the snapshot survived, or vice versa).
  local snap = held[k] and tonumber(string.match(held[k], '^(%d+):'))
  if snap and snap > base then base = snap end
  nextseq[topic] = base + 1
  moved[#moved + 1] = topic
  moved[#moved + 1] = string.format('%d', base + count[topic])
end
redis.call('HSET', seqkey, unpack(moved))
local out = {'MB1', ns(ARGV[2])}
local seqs, last = {}, {}
for i = 3, #ARGV, 2 do
  local topic, payload = ARGV[i], ARGV[i + 1]
  local seq = nextseq[topic]
  nextseq[topic] = seq + 1
  local text = string.format('%d', seq)
  last[topic] = text .. ':' .. payload
  seqs[#seqs + 1] = seq
  out[#out + 1] = ns(topic)
  out[#out + 1] = ns(text)
  out[#out + 1] = ns(payload)
end
local snaps = {}
for _, topic in ipairs(order) do
  snaps[#snaps + 1] = topic
  snaps[#snaps + 1] = last[topic]
end
redis.call('HSET', snapkey, unpack(snaps))
redis.call('SPUBLISH', ARGV[1], table.concat(out))
return seqs
"""

# KEYS: snapshot hash. ARGV: topic, seq, payload, ... Returns how many were written.
PUT_SNAPSHOTS = """
local written = 0
for i = 1, #ARGV, 3 do
  local topic, seq = ARGV[i], tonumber(ARGV[i + 1])
  local cur = redis.call('HGET', KEYS[1], topic)
  local held = cur and tonumber(string.match(cur, '^(%d+):'))
  if not held or held < seq then
    redis.call('HSET', KEYS[1], topic, ARGV[i + 1] .. ':' .. ARGV[i + 2])
    written = written + 1
  end
end
return written
"""


def encode_snapshot(seq: int, payload: bytes) -> bytes:
    return b"%d:" % seq + payload


def decode_snapshot(topic: str, raw: bytes) -> Snapshot:
    seq, _, payload = raw.partition(b":")
    return Snapshot(topic=topic, payload=payload, seq=int(seq))


class SeqLedger:
    def __init__(self, redis: Redis | RedisCluster) -> None:
        self._redis = redis
        self._stamp = redis.register_script(STAMP)
        self._put = redis.register_script(PUT_SNAPSHOTS)
        self.round_trips = 0  # scripts sent: the Redis operations the bench counts

    async def stamp(self, partition: int, node_id: str, entries: Sequence[tuple[str, bytes]]) -> list[int]:
        """Number ``entries`` (topic, payload) in order, store each topic's last as its
        snapshot and publish the batch on the partition's channel; one round trip."""
        args: list[str | bytes] = [keys.partition_channel(partition), node_id]
        for topic, payload in entries:
            args.append(topic)
            args.append(payload)
        self.round_trips += 1
        result = await self._stamp(
            keys=[keys.partition_seq(partition), keys.partition_snapshots(partition)], args=args
        )
        return [int(seq) for seq in cast("list[Any]", result)]

    async def put_snapshots(self, partition: int, snapshots: Iterable[Snapshot]) -> int:
        """Store each snapshot unless Redis already holds one with a higher or equal seq."""
        args: list[str | bytes | int] = []
        for snap in snapshots:
            args += [snap.topic, snap.seq, snap.payload]
        if not args:
            return 0
        self.round_trips += 1
        return int(await self._put(keys=[keys.partition_snapshots(partition)], args=args))

    async def snapshots(self, partitions: Iterable[int]) -> list[Snapshot]:
        """Every stored snapshot of ``partitions`` (read concurrently, one HGETALL each)."""
        names = [keys.partition_snapshots(p) for p in partitions]
        self.round_trips += len(names)
        with unavailable_as("snapshots"):
            tables = await asyncio.gather(*(self._redis.hgetall(name) for name in names))
        return [
            decode_snapshot(topic.decode(), raw)
            for rows in cast("list[dict[bytes, bytes]]", tables)
            for topic, raw in rows.items()
        ]
