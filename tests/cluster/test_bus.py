"""bridge.cluster.bus: the batch codec (table-driven) and cross-node fan-out on a real Redis
Cluster: two TickBus instances are two nodes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge import redis_keys as keys
from bridge.cluster import bus as bus_module
from bridge.cluster.backbone import Backbone
from bridge.cluster.bus import (
    MAX_BATCH_TICKS,
    Batch,
    BatchError,
    Entry,
    ShardedSubscriber,
    TickBus,
    decode_batch,
    encode_batch,
    partition_of,
)
from bridge.cluster.local import RedisCluster as RedisClusterProcesses
from bridge.errors import ClusterUnavailable
from tests.cluster.conftest import eventually
from tests.redis_server import RedisProcess

pytestmark = pytest.mark.timeout(60)
DEADLINE_S = 20.0


@pytest.mark.parametrize(
    ("node", "entries"),
    [
        ("n1", []),
        ("n1", [Entry("market/luno/BTC-ZAR", 1, b'{"p":1}')]),
        ("node-2", [Entry("a", 5, b""), Entry("b", 2**62, b"x" * 1000), Entry("a", 6, b"1:2:3")]),
        ("n", [Entry("tópico/ünïcode", 7, bytes(range(256)))]),
    ],
)
def test_batch_round_trip(node: str, entries: list[Entry]) -> None:
    assert decode_batch(encode_batch(node, entries)) == Batch(node, entries)


@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        (b"", "header"),
        (b"XX12:n1", "header"),
        (b"MB1", "fields"),
        (b"MB12:n1", "fields"),  # a node id and no triple is fine only when complete
        (b"MB12:n11:a1:x1:p", "seq"),
        (b"MB12:n11:a", "fields"),
        (b"MB19:n1", "truncated"),
        (b"MB1x:n1", "length"),
        (b"MB1" + b"9" * 30 + b":n", "length"),
    ],
)
def test_bad_batches(raw: bytes, mentions: str) -> None:
    if raw == b"MB12:n1":
        assert decode_batch(raw) == Batch("n1", [])
        return
    with pytest.raises(BatchError, match=mentions):
        decode_batch(raw)


@pytest.mark.parametrize(
    ("topic", "partitions"), [("market/luno/BTC-ZAR", 16), ("", 16), ("x", 1), ("é", 4096)]
)
def test_partition_is_stable_and_in_range(topic: str, partitions: int) -> None:
    first = partition_of(topic, partitions)
    assert 0 <= first < partitions
    assert partition_of(topic, partitions) == first


def test_partitions_spread_topics() -> None:
    used = {partition_of(f"market/x/PAIR{i}", 16) for i in range(200)}
    assert len(used) == 16


class Node:
    """A TickBus and what it delivered: ``received`` from other nodes, ``own`` from itself,
    ``delivered`` both, in delivery order."""

    def __init__(self, backbone: Backbone, node_id: str, partitions: int = 16) -> None:
        self.node_id = node_id
        self.received: list[Entry] = []
        self.own: list[Entry] = []
        self.delivered: list[Entry] = []
        self.arrival: list[float] = []  # monotonic time of each batch from another node
        self.arrived = asyncio.Event()
        self.bus = TickBus(backbone, node_id=node_id, partitions=partitions, on_batch=self._on_batch)

    def _on_batch(self, batch: Batch) -> None:
        self.delivered += batch.entries
        if batch.node == self.node_id:
            self.own += batch.entries
            return
        self.received += batch.entries
        self.arrival.append(time.monotonic())
        self.arrived.set()

    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.arrival, self.arrival[1:], strict=False)), default=0.0)

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()


async def test_batches_cross_nodes_exactly_once_in_seq_order(make_backbone: Callable[[], Backbone]) -> None:
    a, b = Node(make_backbone(), "a"), Node(make_backbone(), "b")
    await a.bus.start()
    await b.bus.start()
    try:
        topics = [f"market/t/P{i}" for i in range(20)]
        sent: list[tuple[str, bytes, int]] = []
        for step in range(10):  # ten loop steps of 20 ticks each
            futures = [(t, f"{step}".encode(), a.bus.publish(t, f"{step}".encode())) for t in topics]
            for topic, payload, future in futures:
                sent.append((topic, payload, await future))
        await b.wait_for(len(sent))
        # Partitions interleave; within the same ticks, exactly once.
        assert sorted((e.topic, e.seq, e.payload) for e in b.received) == sorted(
            (t, s, p) for t, p, s in sent
        )
        # Exactly once, and per topic in seq order 1..10.
        for topic in topics:
            assert [e.seq for e in b.received if e.topic == topic] == list(range(1, 11))
        # a delivered its own ticks once, from the script's reply (the channel's copy skipped).
        assert a.received == []
        assert sorted((e.topic, e.seq) for e in a.own) == sorted((t, s) for t, _, s in sent)
        # a's subscription gets the channel's copy of each of its batches on its own
        # connection, so b may have everything before a has skipped its last copies.
        await eventually(lambda: a.bus.stats.own_batches_skipped >= a.bus.stats.batches_published)
        assert a.bus.stats.own_batches_skipped == a.bus.stats.batches_published
        assert a.received == []
        # One script per partition per step, not one per tick.
        assert a.bus.stats.batches_published <= 10 * 16
        assert a.bus.stats.batches_published < len(sent)
    finally:
        await a.bus.stop()
        await b.bus.stop()


async def test_one_step_is_one_message_per_partition(make_backbone: Callable[[], Backbone]) -> None:
    a, b = Node(make_backbone(), "a", partitions=1), Node(make_backbone(), "b", partitions=1)
    await a.bus.start()
    await b.bus.start()
    try:
        futures = [a.bus.publish(f"t/{i}", b"x") for i in range(500)]
        await asyncio.gather(*futures)
        await b.wait_for(500)
        assert a.bus.stats.batches_published == 1
        assert b.bus.stats.batches_received == 1
    finally:
        await a.bus.stop()
        await b.bus.stop()


async def test_garbage_on_a_channel_is_dropped(make_backbone: Callable[[], Backbone]) -> None:
    a, b = Node(make_backbone(), "a", partitions=1), Node(make_backbone(), "b", partitions=1)
    await b.bus.start()
    await a.bus.start()
    try:
        await a.bus.ledger._redis.spublish(keys.partition_channel(0), b"not a batch")
        await a.bus.publish("t", b"after")
        await b.wait_for(1)
        assert b.received == [Entry("t", 1, b"after")]
        assert b.bus.stats.bad_messages == 1
    finally:
        await a.bus.stop()
        await b.bus.stop()


async def test_failover_while_ticks_flow(
    make_backbone: Callable[[], Backbone], redis_cluster: RedisClusterProcesses
) -> None:
    """CLUSTER FAILOVER of the shard of a partition while ticks flow: ticks resume on the other
    node (the time is printed; the 10 s goal is the bench's to report), in seq order, once."""
    a, b = Node(make_backbone(), "a", partitions=1), Node(make_backbone(), "b", partitions=1)
    await a.bus.start()
    await b.bus.start()
    try:
        master = redis_cluster.master_of(keys.partition_channel(0))
        stop = asyncio.Event()
        errors = 0

        async def feed() -> None:
            nonlocal errors
            while not stop.is_set():
                try:
                    await a.bus.publish("t/f", b"tick")
                except Exception:
                    errors += 1
                await asyncio.sleep(0.005)

        feeder = asyncio.create_task(feed())
        await b.wait_for(10)
        resubscribes = b.bus.resubscribes
        switched = time.monotonic()
        await asyncio.to_thread(redis_cluster.failover, master)
        # From here on the old master refuses the scripts (MOVED): new ticks reach b only
        # through its subscription on the new master.
        await b.wait_for(len(b.received) + 10)
        resumed = time.monotonic() - switched
        stop.set()
        await feeder
        print(
            f"\nfailover: longest gap between batches on the other node {b.longest_gap():.2f} s;"
            f" 10 new ticks {resumed:.2f} s after the switch began ({errors} publish errors)"
        )
        seqs = [e.seq for e in b.received]
        assert seqs == sorted(set(seqs))
        assert redis_cluster.master_of(keys.partition_channel(0)) is not master
        assert b.bus.resubscribes > resubscribes
    finally:
        await a.bus.stop()
        await b.bus.stop()


async def test_master_killed_while_ticks_flow(
    make_backbone: Callable[[], Backbone], redis_cluster: RedisClusterProcesses
) -> None:
    """kill -9 of the partition's master: its replica takes over after the node timeout and
    ticks resume on the other node (time printed); the killed node rejoins afterwards."""
    a, b = Node(make_backbone(), "a", partitions=1), Node(make_backbone(), "b", partitions=1)
    await a.bus.start()
    await b.bus.start()
    master = redis_cluster.master_of(keys.partition_channel(0))
    try:
        stop = asyncio.Event()
        errors = 0

        async def feed() -> None:
            nonlocal errors
            while not stop.is_set():
                try:
                    await a.bus.publish("t/k", b"tick")
                except Exception:
                    errors += 1
                    await asyncio.sleep(0.1)  # the cluster client retried already: pace
                await asyncio.sleep(0.005)

        feeder = asyncio.create_task(feed())
        await b.wait_for(10)
        killed = time.monotonic()
        await asyncio.to_thread(redis_cluster.kill_master, master)
        await b.wait_for(len(b.received) + 10)
        resumed = time.monotonic() - killed
        stop.set()
        await feeder
        print(
            f"\nmaster killed: longest gap between batches on the other node {b.longest_gap():.2f} s;"
            f" 10 new ticks {resumed:.2f} s after the kill ({errors} publish errors)"
        )
        seqs = [e.seq for e in b.received]
        assert seqs == sorted(set(seqs))
    finally:
        await a.bus.stop()
        await b.bus.stop()
        await asyncio.to_thread(redis_cluster.restart, master)


async def test_single_redis_server_works_too(redis_url: str) -> None:
    """cluster.redis_url: one plain Redis (sharded pub/sub works there as well)."""
    backbones = [Backbone(redis_url=redis_url), Backbone(redis_url=redis_url)]
    a, b = Node(backbones[0], "a", partitions=4), Node(backbones[1], "b", partitions=4)
    await a.bus.start()
    await b.bus.start()
    try:
        seqs = await asyncio.gather(*(a.bus.publish(f"t/{i % 3}", b"x") for i in range(30)))
        await b.wait_for(30)
        assert sorted(seqs) == sorted([*range(1, 11)] * 3)
        assert sorted((e.topic, e.seq) for e in b.received) == sorted(
            (f"t/{i % 3}", i // 3 + 1) for i in range(30)
        )
    finally:
        await a.bus.stop()
        await b.bus.stop()


async def test_racing_nodes_deliver_each_topic_in_seq_order(make_backbone: Callable[[], Backbone]) -> None:
    """Two nodes publish the same topics at once: on each node, own and received ticks
    together are delivered in strictly increasing seq order per topic."""
    a, b = Node(make_backbone(), "a", partitions=2), Node(make_backbone(), "b", partitions=2)
    await a.bus.start()
    await b.bus.start()
    try:

        async def feed(node: Node) -> None:
            for i in range(40):
                await asyncio.gather(
                    *(node.bus.publish(f"t/{k}", f"{node.node_id}{i}".encode()) for k in range(5))
                )

        await asyncio.gather(feed(a), feed(b))
        for node in (a, b):
            for k in range(5):
                seqs = [e.seq for e in node.delivered if e.topic == f"t/{k}"]
                assert seqs == sorted(set(seqs)), node.node_id
            # What was not delivered was superseded: counted, not lost silently.
            assert len(node.delivered) + node.bus.stats.stale_dropped >= len(node.own) + len(node.received)
    finally:
        await a.bus.stop()
        await b.bus.stop()


async def test_big_steps_are_cut_into_bounded_batches(make_backbone: Callable[[], Backbone]) -> None:
    a, b = Node(make_backbone(), "a", partitions=1), Node(make_backbone(), "b", partitions=1)
    await a.bus.start()
    await b.bus.start()
    try:
        count = MAX_BATCH_TICKS * 2 + 10
        seqs = await asyncio.gather(*(a.bus.publish("t/big", b"x") for _ in range(count)))
        assert seqs == list(range(1, count + 1))
        await b.wait_for(count)
        assert a.bus.stats.batches_published == 3
        assert [e.seq for e in b.received] == seqs
    finally:
        await a.bus.stop()
        await b.bus.stop()


async def test_a_failing_callback_does_not_stop_the_bus(make_backbone: Callable[[], Backbone]) -> None:
    got: list[Entry] = []

    def on_batch(batch: Batch) -> None:
        if batch.node == "b":
            return
        got.extend(batch.entries)
        if len(got) == 1:
            raise RuntimeError("the broker's delivery broke")

    a = Node(make_backbone(), "a", partitions=1)
    b = TickBus(make_backbone(), node_id="b", partitions=1, on_batch=on_batch)
    await a.bus.start()
    await b.start()
    try:
        await a.bus.publish("t", b"1")
        await a.bus.publish("t", b"2")
        async with asyncio.timeout(DEADLINE_S):
            while len(got) < 2:
                await a.bus.publish("t", b"more")
        assert b.stats.callback_errors == 1
        assert b.ready
    finally:
        await a.bus.stop()
        await b.stop()


async def test_publish_fails_cleanly_without_redis(tmp_path: Path) -> None:
    """Redis gone: publish() raises ClusterUnavailable (nothing delivered); past MAX_PENDING
    waiting ticks it refuses at once instead of growing."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    backbone = Backbone(redis_url=server.url)
    a = Node(backbone, "a", partitions=1)
    await a.bus.start()
    try:
        assert await a.bus.publish("t", b"ok") == 1
        server.kill()
        with pytest.raises(ClusterUnavailable) as caught:
            await a.bus.publish("t", b"lost")
        assert caught.value.operation == "publish"
        assert a.own == [Entry("t", 1, b"ok")]
        assert a.bus.stats.publish_errors >= 1
    finally:
        await a.bus.stop()
        await backbone.aclose()
        server.stop()


async def test_publish_refuses_past_max_pending(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus_module, "MAX_PENDING", 5)
    backbone = Backbone(redis_url=redis_url)
    a = Node(backbone, "a", partitions=1)
    await a.bus.start()
    try:
        futures = [a.bus.publish("t", b"x") for _ in range(7)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[:5] == [1, 2, 3, 4, 5]
        assert all(isinstance(r, ClusterUnavailable) for r in results[5:])
        assert a.bus.stats.refused_full == 2
        assert await a.bus.publish("t", b"later") == 6  # room again once the batch went out
    finally:
        await a.bus.stop()
        await backbone.aclose()


async def test_a_hung_redis_is_noticed_and_left_behind(tmp_path: Path) -> None:
    """A Redis that stops answering (SIGSTOP: connections stay open) is noticed by the
    periodic probe; the subscriber resubscribes once it answers again and ticks flow."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    backbones = [Backbone(redis_url=server.url), Backbone(redis_url=server.url)]
    a, b = Node(backbones[0], "a", partitions=1), Node(backbones[1], "b", partitions=1)
    await a.bus.start()
    await b.bus.start()
    try:
        await a.bus.publish("t", b"before")
        await b.wait_for(1)
        with server.paused():
            await eventually(lambda: not b.bus.ready)
        await eventually(lambda: b.bus.ready)
        assert b.bus.resubscribes >= 1
        await a.bus.publish("t", b"after")
        await b.wait_for(2)
        assert [e.payload for e in b.received] == [b"before", b"after"]
    finally:
        await a.bus.stop()
        await b.bus.stop()
        for backbone in backbones:
            await backbone.aclose()
        server.stop()


async def test_slot_migration_while_ticks_flow(
    make_backbone: Callable[[], Backbone], redis_cluster: RedisClusterProcesses
) -> None:
    """The partition's slot (its counter, snapshots and channel) moves to another master: the
    subscriber follows it, and the seq continues from the migrated counter."""
    a, b = Node(make_backbone(), "a", partitions=1), Node(make_backbone(), "b", partitions=1)
    await a.bus.start()
    await b.bus.start()
    try:
        seqs = [await a.bus.publish("t/m", b"x") for _ in range(5)]
        await b.wait_for(5)
        source = redis_cluster.master_of(keys.partition_channel(0))
        target = next(m for m in redis_cluster.masters() if m is not source)
        resubscribes = b.bus.resubscribes
        await asyncio.to_thread(redis_cluster.move_slot, keys.partition_channel(0), target)
        assert redis_cluster.master_of(keys.partition_channel(0)) is target
        await eventually(lambda: b.bus.resubscribes > resubscribes and b.bus.ready)
        seqs += [await a.bus.publish("t/m", b"y") for _ in range(5)]
        await b.wait_for(10)
        assert seqs == list(range(1, 11))
        assert [e.seq for e in b.received] == seqs
    finally:
        await a.bus.stop()
        await b.bus.stop()


async def test_a_stalled_shard_does_not_hold_up_the_others(
    make_backbone: Callable[[], Backbone], redis_cluster: RedisClusterProcesses
) -> None:
    """Partitions flush independently: while one master is hung, ticks of a partition on
    another master still go out and arrive."""
    a, b = Node(make_backbone(), "a"), Node(make_backbone(), "b")
    await a.bus.start()
    await b.bus.start()
    try:
        owner: dict[int, str] = {}  # master port -> a topic whose partition it holds
        for i in range(200):
            topic = f"t/{i}"
            owner.setdefault(
                redis_cluster.master_of(keys.partition_channel(partition_of(topic, 16))).port, topic
            )
        (stuck_port, stuck_topic), (_, free_topic) = list(owner.items())[:2]
        stuck_master = next(n for n in redis_cluster.nodes if n.port == stuck_port)
        with redis_cluster.paused(stuck_master):
            stuck = a.bus.publish(stuck_topic, b"stuck")
            assert await a.bus.publish(free_topic, b"through") == 1
            await b.wait_for(1)
            assert b.received == [Entry(free_topic, 1, b"through")]
            assert not stuck.done()
        await asyncio.gather(stuck, return_exceptions=True)  # it completes or fails; either way, later
    finally:
        await a.bus.stop()
        await b.bus.stop()


async def test_stop_returns_while_a_shard_is_hung(
    make_backbone: Callable[[], Backbone], redis_cluster: RedisClusterProcesses
) -> None:
    """A node stops even when the shard its subscription is on does not answer: closing that
    connection is bounded (bus.CLOSE_S), so stop() cannot hang on it."""
    b = Node(make_backbone(), "b", partitions=1)
    await b.bus.start()
    master = redis_cluster.master_of(keys.partition_channel(0))
    with redis_cluster.paused(master):
        async with asyncio.timeout(DEADLINE_S):
            await b.bus.stop()
    assert not b.bus.ready


class SwallowingBackbone(Backbone):
    """A real backbone whose slot-map probe, once, swallows the cancellation that reaches it
    and goes on: what a Redis client that catches too much does (the subscriber's watcher
    then ran on after stop(), and its tasks were destroyed pending when the loop closed)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.probing = asyncio.Event()
        self.swallowed = 0

    async def probe(self) -> None:
        await super().probe()
        self.probing.set()
        if self.swallowed == 0:
            try:
                await asyncio.Event().wait()  # hangs until cancelled
            except asyncio.CancelledError:
                self.swallowed += 1


async def test_a_subscriber_stops_even_when_a_cancellation_is_swallowed(cluster_nodes: list[str]) -> None:
    backbone = SwallowingBackbone(cluster_nodes=cluster_nodes)
    try:
        await backbone.connect()
        subscriber = ShardedSubscriber(backbone, [keys.partition_channel(0)], lambda _c, _d: None)
        subscriber.start()
        async with asyncio.timeout(DEADLINE_S):
            await subscriber.wait_ready()
            await backbone.probing.wait()  # the watcher is in the probe
            await subscriber.stop()
        assert backbone.swallowed == 1
        assert not subscriber.ready
    finally:
        await backbone.aclose()
