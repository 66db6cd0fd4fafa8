"""Cross-node tick fan-out over Redis 7 sharded pub/sub.

Topics hash into ``partitions`` channels (``{mb:p7}:ticks``, :func:`partition_of`); each lives
on the shard owning its slot. Every tick published in one event-loop step (and those that
arrive while the previous batch is in flight) goes to Redis as one script per partition, which
numbers them (:mod:`bridge.cluster.seq`) and SPUBLISHes them as one message: Redis round trips
per tick fall as load rises. Every node subscribes to every partition.

``on_batch`` is the node's one entry to local delivery, for every tick of the cluster: batches
from other nodes as they arrive on the channels, and this node's own as soon as their seqs
come back from the script (the copy that comes back on the channel is skipped: ``node`` in
the batch says whose it is). Because both go through one ordered path, every node delivers a
topic in strictly increasing seq order, each tick at most once: an entry at or below the last
seq delivered for its topic is dropped. That only happens when two nodes publish the same
topic within one Redis round trip: the older tick is dropped where the newer was already
delivered (latest-value semantics, like the broker's conflation).

Interface (what the broker calls)::

    bus = TickBus(backbone, node_id="n1", partitions=16, on_batch=deliver)
    await bus.start()            # returns once subscribed to every partition
    bus.publish(topic, payload)  # -> Future[int]: the cluster-wide seq, or ClusterUnavailable
    bus.ready                    # subscribed everywhere right now
    await bus.stop()

``on_batch(batch)`` runs on the event loop; it must not block (hand the ticks to the normal
delivery pipeline, which applies the time zone once per zone). An exception in it is logged
and counted, never fatal to the bus. Pub/sub is at-most-once: while a shard fails over, its
batches are lost (the subscriber resubscribes with backoff; the snapshots in Redis hold the
latest tick of every topic). While Redis cannot be reached, ``publish`` fails (the future
raises :class:`~bridge.errors.ClusterUnavailable`) and nothing is delivered for those ticks;
a fallback to local-only delivery is the broker's to decide. At most :data:`MAX_PENDING`
ticks wait for Redis; beyond that ``publish`` fails at once rather than grow memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from bridge import redis_keys as keys
from bridge.cluster.backbone import Backbone, Shard
from bridge.cluster.seq import SeqLedger
from bridge.errors import ClusterMessageError, ClusterUnavailable
from bridge.tasks import stop_task

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_TICKS",
    "MAX_PENDING",
    "Batch",
    "BatchError",
    "Entry",
    "ShardedSubscriber",
    "TickBus",
    "decode_batch",
    "encode_batch",
    "partition_of",
]

log = logging.getLogger(__name__)

MAGIC = b"MB1"
# How often a subscriber re-reads the slot map and PINGs its shards: a failover that moved a
# partition without telling us (no SUNSUBSCRIBE reached us) is noticed within this time.
# The longest closing one shard's subscription may take.
CLOSE_S = 1.0
CHECK_S = 1.0
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
# One script (and so one pub/sub message) carries at most this much: a subscriber's output
# buffer in Redis (client-output-buffer-limit pubsub, 8 MB soft) never fills from one batch.
MAX_BATCH_TICKS = 1000
MAX_BATCH_BYTES = 256 * 1024
# Ticks waiting for Redis (queued or in flight) before publish() refuses new ones.
MAX_PENDING = 100_000


def partition_of(topic: str, partitions: int) -> int:
    """Stable across nodes and restarts (not Python's salted ``hash``)."""
    return zlib.crc32(topic.encode("utf-8", "surrogatepass")) % partitions


@dataclass(frozen=True, slots=True)
class Entry:
    topic: str
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Batch:
    node: str
    entries: list[Entry]


class BatchError(ClusterMessageError):
    """A message on a tick channel is not a batch (another writer, or a version skew)."""


def _netstring(raw: bytes) -> bytes:
    return b"%d:" % len(raw) + raw


def encode_batch(node: str, entries: Sequence[Entry]) -> bytes:
    """What :data:`bridge.cluster.seq.STAMP` builds in Lua; here for tests and tools."""
    parts = [MAGIC, _netstring(node.encode())]
    for entry in entries:
        parts += [_netstring(entry.topic.encode()), _netstring(b"%d" % entry.seq), _netstring(entry.payload)]
    return b"".join(parts)


def decode_batch(raw: bytes) -> Batch:
    if not raw.startswith(MAGIC):
        raise BatchError("no MB1 header")
    view = memoryview(raw)
    pos = len(MAGIC)
    fields: list[bytes] = []
    end = len(raw)
    while pos < end:
        colon = raw.find(b":", pos, pos + 21)
        if colon < 0 or not raw[pos:colon].isdigit():
            raise BatchError(f"bad length at byte {pos}")
        size = int(raw[pos:colon])
        start = colon + 1
        if start + size > end:
            raise BatchError(f"truncated field at byte {pos}")
        fields.append(bytes(view[start : start + size]))
        pos = start + size
    if not fields or (len(fields) - 1) % 3:
        raise BatchError(f"{len(fields)} fields: not a node id and (topic, seq, payload) triples")
    entries = []
    for i in range(1, len(fields), 3):
        if not fields[i + 1].isdigit():
            raise BatchError("seq is not a number")
        entries.append(Entry(fields[i].decode(errors="replace"), int(fields[i + 1]), fields[i + 2]))
    return Batch(fields[0].decode(errors="replace"), entries)


class ShardedSubscriber:
    """SSUBSCRIBEs ``channels`` on the shards owning them and calls ``handler(channel, data)``
    for each message; resubscribes (with backoff) when a slot moves, a shard fails over or a
    connection drops. One plain connection and one reader task per shard."""

    def __init__(
        self, backbone: Backbone, channels: Sequence[str], handler: Callable[[str, bytes], None]
    ) -> None:
        self._backbone = backbone
        self._channels = list(channels)
        self._handler = handler
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._failing = False
        # stop() says so here too, not only by cancelling: a cancellation swallowed inside
        # the Redis client (seen on Python 3.11 in the slot-map probe) must not keep the
        # watcher, and so the whole subscription, running after stop().
        self._stopping = False
        self._changed: asyncio.Event | None = None  # the running _serve's
        self.resubscribes = 0  # times the subscriptions were rebuilt after the first

    @property
    def ready(self) -> bool:
        return self._subscribed.is_set()

    async def wait_ready(self) -> None:
        await self._subscribed.wait()

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="cluster-subscriber")

    async def stop(self) -> None:
        self._stopping = True
        if self._changed is not None:
            self._changed.set()
        await stop_task(self._task)
        self._task = None
        self._subscribed.clear()

    async def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        first = True
        while not self._stopping:
            failed: BaseException | None = None
            try:
                if not first:
                    self.resubscribes += 1
                    await self._backbone.refresh()
                first = False
                await self._serve(self._backbone.owners(self._channels))
                backoff = BACKOFF_MIN_S  # a clean change of layout: resubscribe at once
            except* (RedisError, OSError) as group:
                failed = group.exceptions[0]
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Python 3.11's TaskGroup raises the children's errors instead of the
                # cancellation when both happen: stop() must still stop us.
                raise asyncio.CancelledError
            if failed is not None:
                self._subscribed.clear()
                if not self._failing:  # once per outage, not once per attempt
                    log.warning(
                        "cluster subscriber: %s: %s; resubscribing with backoff",
                        type(failed).__name__,
                        failed,
                    )
                self._failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _serve(self, layout: dict[Shard, list[list[str]]]) -> None:
        """Subscribe per the layout and read until something changes; returns to resubscribe."""
        clients: list[Redis] = []
        pubsubs: list[PubSub] = []
        changed = self._changed = asyncio.Event()
        confirmed: list[PubSub] = []

        def on_confirmed(pubsub: PubSub) -> None:
            confirmed.append(pubsub)
            if len(confirmed) == len(pubsubs):
                log.log(
                    logging.WARNING if self._failing else logging.INFO,
                    "cluster subscriber: subscribed on %d shard(s)",
                    len(pubsubs),
                )
                self._failing = False
                self._subscribed.set()

        try:
            if self._stopping:
                return
            for shard, groups in layout.items():
                client = shard.open()
                clients.append(client)
                pubsub = client.pubsub()
                pubsubs.append(pubsub)
                for group in groups:
                    await pubsub.ssubscribe(*group)
            async with asyncio.TaskGroup() as tasks:
                children = [
                    tasks.create_task(self._read(pubsub, changed, on_confirmed)) for pubsub in pubsubs
                ]
                children.append(tasks.create_task(self._watch(layout, changed)))
                await changed.wait()
                for task in children:  # the readers block on their sockets until cancelled
                    task.cancel()
        finally:
            self._changed = None
            self._subscribed.clear()
            await _close_all(pubsubs, clients)

    async def _read(
        self, pubsub: PubSub, changed: asyncio.Event, on_confirmed: Callable[[PubSub], None]
    ) -> None:
        pending = len(pubsub.shard_channels)  # SSUBSCRIBE confirmations to come
        async for message in pubsub.listen():
            kind = message["type"]
            if kind == "smessage":
                channel = message["channel"]
                try:
                    self._handler(
                        channel.decode() if isinstance(channel, bytes) else channel, message["data"]
                    )
                except Exception:  # a bug in the handler must not stop the subscription
                    log.exception("cluster subscriber: the handler failed")
            elif kind == "ssubscribe":
                pending -= 1
                if pending == 0:
                    on_confirmed(pubsub)
            elif kind == "sunsubscribe":
                # The server dropped us: the slot moved (migration or failover).
                log.info(
                    "cluster subscriber: %s unsubscribed by the server; resubscribing", message["channel"]
                )
                break
        # Unsubscribed (or the stream ended): resubscribe everything.
        changed.set()

    async def _watch(self, layout: dict[Shard, list[list[str]]], changed: asyncio.Event) -> None:
        expected = {shard.name: groups for shard, groups in layout.items()}
        while not changed.is_set():
            await asyncio.sleep(CHECK_S)
            await self._backbone.probe()
            now = {shard.name: groups for shard, groups in self._backbone.owners(self._channels).items()}
            if now != expected:
                log.info("cluster subscriber: the slot map changed; resubscribing")
                changed.set()


async def _close_all(pubsubs: list[PubSub], clients: list[Redis]) -> None:
    """Close every shard's subscription and connection, all at once and within CLOSE_S in
    all: closing a connection to a dead or hung shard can wait on its socket, and a
    resubscribe (or a stop) must not be held up by the shards it is leaving."""

    async def close(closing: Awaitable[None]) -> None:
        with contextlib.suppress(RedisError, OSError):
            await closing

    closes = [close(p.aclose()) for p in pubsubs] + [close(c.aclose()) for c in clients]  # type: ignore[no-untyped-call]
    if not closes:
        return
    tasks = [asyncio.ensure_future(closing) for closing in closes]
    _, stuck = await asyncio.wait(tasks, timeout=CLOSE_S)
    for task in stuck:
        task.cancel()
    if stuck:
        # Cancelled closes end at their next await; they are not waited for beyond that.
        await asyncio.wait(stuck, timeout=CLOSE_S)


@dataclass
class BusStats:
    ticks_published: int = 0
    batches_published: int = 0  # = Redis round trips for publishing (one script each)
    publish_errors: int = 0
    batches_received: int = 0
    own_batches_skipped: int = 0  # our own, back from the channel (delivered from the reply)
    entries_delivered: int = 0  # handed to on_batch, own and received
    stale_dropped: int = 0  # at or below the topic's last delivered seq
    bad_messages: int = 0
    callback_errors: int = 0
    refused_full: int = 0  # publish() refused: MAX_PENDING ticks already waiting


class TickBus:
    """See the module docstring."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        node_id: str,
        partitions: int,
        on_batch: Callable[[Batch], None],
    ) -> None:
        self.node_id = node_id
        self.partitions = partitions
        self._backbone = backbone
        self._on_batch = on_batch
        self._ledger: SeqLedger | None = None
        self._pending: dict[int, list[tuple[str, bytes, asyncio.Future[int]]]] = {}
        self._waiting = 0  # ticks queued or in flight
        self._failing = False
        # Partitions flush independently (a shard that fails over stalls only its own): at
        # most one script in flight per partition; what arrives meanwhile is the next batch.
        self._scheduled: set[int] = set()  # a flush is due in the next loop step
        self._flushing: dict[int, asyncio.Task[None]] = {}
        self._running = False
        # Highest seq handed on per topic: a resubscribe overlap or a replayed message never
        # delivers a tick twice or out of order. One int per topic seen.
        self._last_seq: dict[str, int] = {}
        self._subscriber = ShardedSubscriber(
            backbone, [keys.partition_channel(p) for p in range(partitions)], self._received
        )
        self.stats = BusStats()

    @property
    def ready(self) -> bool:
        return self._subscriber.ready

    @property
    def resubscribes(self) -> int:
        return self._subscriber.resubscribes

    @property
    def ledger(self) -> SeqLedger:
        if self._ledger is None:
            raise RuntimeError("TickBus.start() first")
        return self._ledger

    async def start(self) -> None:
        await self._backbone.connect()
        self._ledger = SeqLedger(self._backbone.redis)
        self._running = True
        self._subscriber.start()
        await self._subscriber.wait_ready()

    async def stop(self) -> None:
        self._running = False
        for task in list(self._flushing.values()):
            await stop_task(task)
        self._flushing.clear()
        self._scheduled.clear()
        await self._subscriber.stop()
        for batch in self._pending.values():
            _cancel(batch)
        self._pending.clear()
        self._waiting = 0

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[int]:
        """Queue a tick for this loop step's batch; the future gets its cluster-wide seq (or
        the Redis error). Order per topic is the order of the calls."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self._waiting >= MAX_PENDING:
            self.stats.refused_full += 1
            future.set_exception(
                ClusterUnavailable("publish", f"{self._waiting} ticks already wait for Redis")
            )
            return future
        self._waiting += 1
        partition = partition_of(topic, self.partitions)
        self._pending.setdefault(partition, []).append((topic, payload, future))
        if partition not in self._scheduled and partition not in self._flushing:
            # The callback runs in the next loop step: every tick of this step joins the batch.
            self._scheduled.add(partition)
            asyncio.get_running_loop().call_soon(self._start_flush, partition)
        return future

    def _start_flush(self, partition: int) -> None:
        self._scheduled.discard(partition)
        batch = self._pending.pop(partition, None)
        if not batch:
            return
        if not self._running:  # stopped (or never started): nothing goes out
            self._waiting -= len(batch)
            _cancel(batch)
            return
        self._flushing[partition] = asyncio.create_task(
            self._flush_then_next(partition, batch), name=f"cluster-bus-flush-{partition}"
        )

    async def _flush_then_next(
        self, partition: int, batch: list[tuple[str, bytes, asyncio.Future[int]]]
    ) -> None:
        try:
            await self._flush(partition, batch)
        except asyncio.CancelledError:
            _cancel(batch)
            raise
        finally:
            del self._flushing[partition]
        # What arrived while this batch was in flight goes out now, as one batch.
        if partition in self._pending:
            self._start_flush(partition)

    async def _flush(self, partition: int, batch: list[tuple[str, bytes, asyncio.Future[int]]]) -> None:
        # Chunks in order: a topic's ticks stay in order across them.
        for chunk in _chunks(batch):
            try:
                await self._flush_chunk(partition, chunk)
            finally:
                self._waiting -= len(chunk)

    async def _flush_chunk(self, partition: int, batch: list[tuple[str, bytes, asyncio.Future[int]]]) -> None:
        try:
            seqs = await self.ledger.stamp(
                partition, self.node_id, [(topic, payload) for topic, payload, _ in batch]
            )
        except (RedisError, OSError) as exc:
            self.stats.publish_errors += 1
            if not self._failing:  # once per outage, not once per batch
                log.warning("cluster bus: publishing fails: %s: %s", type(exc).__name__, exc)
            self._failing = True
            error = ClusterUnavailable("publish", f"{type(exc).__name__}: {exc}")
            error.__cause__ = exc
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
                    future.exception()  # a caller that does not await it gets no GC warning
            return
        if self._failing:
            log.warning("cluster bus: publishing works again")
            self._failing = False
        self.stats.batches_published += 1
        self.stats.ticks_published += len(batch)
        entries = [Entry(topic, seq, payload) for (topic, payload, _), seq in zip(batch, seqs, strict=True)]
        self._deliver(Batch(self.node_id, entries))
        for (_, _, future), seq in zip(batch, seqs, strict=True):
            if not future.done():
                future.set_result(seq)

    def _deliver(self, batch: Batch) -> None:
        """Hand ``batch`` to on_batch without what is at or below its topic's last seq."""
        fresh = []
        last = self._last_seq
        for entry in batch.entries:
            if entry.seq <= last.get(entry.topic, 0):
                self.stats.stale_dropped += 1
                continue
            last[entry.topic] = entry.seq
            fresh.append(entry)
        if not fresh:
            return
        self.stats.entries_delivered += len(fresh)
        try:
            self._on_batch(Batch(batch.node, fresh) if len(fresh) != len(batch.entries) else batch)
        except Exception:
            self.stats.callback_errors += 1
            log.exception("cluster bus: on_batch failed; the bus goes on")

    def _received(self, channel: str, data: bytes) -> None:
        try:
            batch = decode_batch(data)
        except BatchError as exc:
            self.stats.bad_messages += 1
            log.warning("cluster bus: dropped a message on %s: %s", channel, exc)
            return
        self.stats.batches_received += 1
        if batch.node == self.node_id:
            self.stats.own_batches_skipped += 1  # delivered from the script's reply already
            return
        self._deliver(batch)


def _cancel(batch: list[tuple[str, bytes, asyncio.Future[int]]]) -> None:
    for _, _, future in batch:
        future.cancel()


def _chunks(
    batch: list[tuple[str, bytes, asyncio.Future[int]]],
) -> list[list[tuple[str, bytes, asyncio.Future[int]]]]:
    chunks: list[list[tuple[str, bytes, asyncio.Future[int]]]] = [[]]
    size = 0
    for item in batch:
        cost = len(item[0]) + len(item[1]) + 32
        if chunks[-1] and (len(chunks[-1]) >= MAX_BATCH_TICKS or size + cost > MAX_BATCH_BYTES):
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += cost
    return chunks
