"""bridge.cluster.seq: one seq per topic across nodes, and snapshots that never regress, on a
real Redis Cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from bridge import redis_keys as keys
from bridge.cluster.backbone import Backbone
from bridge.cluster.bus import Batch, Entry, TickBus, partition_of
from bridge.cluster.local import ClusterNodeProcess
from bridge.cluster.local import RedisCluster as RedisClusterProcesses
from bridge.cluster.seq import SeqLedger, decode_snapshot, encode_snapshot
from bridge.core.store import Snapshot

pytestmark = pytest.mark.timeout(60)
DEADLINE_S = 20.0


@pytest.mark.parametrize(
    ("seq", "payload"),
    [(0, b""), (1, b"{}"), (42, b"1:2"), (2**63 - 1, b'{"p":"9:9"}'), (7, bytes(range(256)))],
)
def test_snapshot_encoding_round_trip(seq: int, payload: bytes) -> None:
    assert decode_snapshot("t", encode_snapshot(seq, payload)) == Snapshot(
        topic="t", payload=payload, seq=seq
    )


async def test_two_writers_racing_one_topic(make_backbone: Callable[[], Backbone]) -> None:
    """Nodes a and b publish the same topic at once: every seq is distinct, each node's own
    are increasing in its call order, and a third node receives all of them in seq order."""
    seen: list[Entry] = []
    done = asyncio.Event()
    total = 2 * 300

    def on_batch(batch: Batch) -> None:
        seen.extend(batch.entries)
        if len(seen) >= total:
            done.set()

    a = TickBus(make_backbone(), node_id="a", partitions=16, on_batch=lambda _: None)
    b = TickBus(make_backbone(), node_id="b", partitions=16, on_batch=lambda _: None)
    c = TickBus(make_backbone(), node_id="c", partitions=16, on_batch=on_batch)
    for bus in (a, b, c):
        await bus.start()
    try:

        async def writer(bus: TickBus) -> list[int]:
            seqs = []
            for i in range(30):  # 30 loop steps of 10 ticks, interleaved with the other node
                batch = [bus.publish("market/race/BTC-ZAR", f"{bus.node_id}{i}".encode()) for _ in range(10)]
                seqs += await asyncio.gather(*batch)
            return seqs

        seqs_a, seqs_b = await asyncio.gather(writer(a), writer(b))
        assert seqs_a == sorted(seqs_a)
        assert seqs_b == sorted(seqs_b)
        assert sorted(seqs_a + seqs_b) == list(range(1, total + 1))  # distinct, no gap
        async with asyncio.timeout(DEADLINE_S):
            await done.wait()
        assert [e.seq for e in seen] == list(range(1, total + 1))
    finally:
        for bus in (a, b, c):
            await bus.stop()


async def test_snapshot_never_regresses(make_backbone: Callable[[], Backbone]) -> None:
    backbone = make_backbone()
    await backbone.connect()
    ledger = SeqLedger(backbone.redis)
    p = partition_of("t/snap", 16)
    assert await ledger.put_snapshots(p, [Snapshot(topic="t/snap", payload=b"five", seq=5)]) == 1
    assert await ledger.put_snapshots(p, [Snapshot(topic="t/snap", payload=b"four", seq=4)]) == 0
    assert await ledger.put_snapshots(p, [Snapshot(topic="t/snap", payload=b"again", seq=5)]) == 0
    assert await ledger.snapshots([p]) == [Snapshot(topic="t/snap", payload=b"five", seq=5)]
    # A stamp continues above the snapshot even when the counter is behind it (lost in a
    # crash failover while the snapshot survived): the seq never goes backwards.
    assert await ledger.put_snapshots(p, [Snapshot(topic="t/snap", payload=b"ten", seq=10)]) == 1
    assert await ledger.stamp(p, "n", [("t/snap", b"next"), ("t/snap", b"then")]) == [11, 12]
    assert await ledger.snapshots([p]) == [Snapshot(topic="t/snap", payload=b"then", seq=12)]


async def test_a_restarted_node_serves_snapshots_at_once(make_backbone: Callable[[], Backbone]) -> None:
    first = TickBus(make_backbone(), node_id="a", partitions=16, on_batch=lambda _: None)
    await first.start()
    topics = [f"market/s/P{i}" for i in range(40)]
    try:
        for round_ in range(3):
            await asyncio.gather(*(first.publish(t, f"{t}#{round_}".encode()) for t in topics))
    finally:
        await first.stop()
    # A new process: a fresh connection and ledger, nothing in memory.
    backbone = make_backbone()
    await backbone.connect()
    snaps = await SeqLedger(backbone.redis).snapshots(range(16))
    assert sorted((s.topic, s.seq, s.payload) for s in snaps) == sorted(
        (t, 3, f"{t}#2".encode()) for t in topics
    )


def _hash_calls(node: ClusterNodeProcess) -> int:
    """Hash commands the master has run (scripts' commands included)."""
    calls = 0
    for line in node.text("INFO", "commandstats").splitlines():
        name = line.partition(":")[0]
        if name in ("cmdstat_hincrby", "cmdstat_hget", "cmdstat_hmget", "cmdstat_hset"):
            calls += int(line.split("calls=")[1].split(",")[0])
    return calls


async def test_a_batch_numbers_each_topic_in_order_in_a_fixed_number_of_commands(
    make_backbone: Callable[[], Backbone], redis_cluster: RedisClusterProcesses
) -> None:
    """Interleaved topics in one batch: each topic's ticks get consecutive numbers in batch
    order, the next batch goes on from there, and the counters and snapshots of all its
    topics are read and written in four hash commands, however many topics (the cost that
    keeps Redis operations per tick low at saturation)."""
    backbone = make_backbone()
    await backbone.connect()
    ledger = SeqLedger(backbone.redis)
    p = partition_of("t/a", 16)
    other = next(f"t/b{i}" for i in range(1000) if partition_of(f"t/b{i}", 16) == p)  # same partition
    master = redis_cluster.master_of(keys.partition_seq(p))
    before = _hash_calls(master)
    batch = [("t/a", b"1"), (other, b"2"), ("t/a", b"3"), ("t/a", b"4"), (other, b"5")]
    assert await ledger.stamp(p, "n", batch) == [1, 1, 2, 3, 2]
    assert _hash_calls(master) - before == 4
    assert await ledger.stamp(p, "n", [(other, b"6"), ("t/a", b"7")]) == [3, 4]
    assert sorted(s.seq for s in await ledger.snapshots([p]) if s.topic in ("t/a", other)) == [3, 4]
    # Forty topics in one batch: still four.
    many = [t for t in (f"t/m{i}" for i in range(5000)) if partition_of(t, 16) == p][:40]
    before = _hash_calls(master)
    assert await ledger.stamp(p, "n", [(t, b"x") for t in many]) == [1] * 40
    assert _hash_calls(master) - before == 4
    # An empty batch touches no hash.
    before = _hash_calls(master)
    assert await ledger.stamp(p, "n", []) == []
    assert _hash_calls(master) - before == 0
